package tcsessions

import (
	"testing"
	"unsafe"

	"github.com/cilium/ebpf/btf"
)

// sessionElemHead is SESSION_ELEM_HEAD in bpf/tc.h: the bytes of a hash
// map element before its value, with an 8-byte key.
const sessionElemHead = 56

// TestSessionElementLayout checks what the sessions entry's layout
// (bpf/tc.h, struct session) assumes: that this kernel's hash map
// element header, with the 8-byte key, takes SESSION_ELEM_HEAD bytes (from
// the kernel's BTF), so that an element is six whole cache lines; and that
// the fields each packet touches are on the lines the comment there names.
func TestSessionElementLayout(t *testing.T) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Fatalf("the kernel's BTF: %v", err)
	}
	var elem *btf.Struct
	if err := spec.TypeByName("htab_elem", &elem); err != nil {
		t.Fatalf("struct htab_elem in the kernel's BTF: %v", err)
	}
	keyOff := -1
	for _, m := range elem.Members {
		if m.Name == "key" {
			keyOff = int(m.Offset.Bytes())
		}
	}
	if keyOff+8 != sessionElemHead {
		t.Errorf("htab_elem's key at byte %d: the element's header with an 8-byte key is %d bytes, the layout assumes %d",
			keyOff, keyOff+8, sessionElemHead)
	}
	var s SessionEntry
	if n := sessionElemHead + int(unsafe.Sizeof(s)); n%64 != 0 {
		t.Errorf("an element is %d bytes, not whole cache lines", n)
	}
	line := func(off uintptr) int { return (sessionElemHead + int(off)) / 64 }
	head := unsafe.Offsetof(s.Key) + unsafe.Sizeof(s.Key)
	live := func(d int) (int, int) {
		start := unsafe.Offsetof(s.Dir) + uintptr(d)*unsafe.Sizeof(s.Dir[0]) + unsafe.Offsetof(s.Dir[0].Total)
		end := unsafe.Offsetof(s.Dir) + uintptr(d)*unsafe.Sizeof(s.Dir[0]) + unsafe.Offsetof(s.Dir[0].Flags) + 4
		return line(start), line(end - 1)
	}
	r0, r1 := live(0)
	s0, s1 := live(1)
	if line(unsafe.Offsetof(s.State)) != 0 || line(head-1) != 1 || r0 != 3 || r1 != 3 || s0 != 5 || s1 != 5 {
		t.Errorf("lines: state %d, key's end %d, request live %d-%d, response live %d-%d; want 0, 1, 3-3, 5-5",
			line(unsafe.Offsetof(s.State)), line(head-1), r0, r1, s0, s1)
	}
}
