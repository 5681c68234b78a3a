package gobin

import (
	"bytes"
	"debug/buildinfo"
	"debug/dwarf"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/clovisor/clovisor/probes/internal/gotlsdemo"
)

const (
	connWrite = "crypto/tls.(*Conn).Write"
	connRead  = "crypto/tls.(*Conn).Read"
)

// symbolsVariants are the builds with symbols whose analysis is checked
// against their .symtab and `go tool objdump`.
var symbolsVariants = []gotlsdemo.Variant{
	{},
	{PIE: true},
	{PIE: true, External: true},
	{Go: gotlsdemo.OldGo},
	{Arch: "arm64"},
}

func open(t *testing.T, path string) (*elf.File, *Binary) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	b, err := Open(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return f, b
}

// TestFuncsMatchSymbolTableAndObjdump: the entries found through
// .gopclntab are the .symtab's, their file offsets what the ELF program
// headers make of them, and the RETs exactly those `go tool objdump`
// lists, for plain, position-independent, externally linked, older-Go and
// arm64 builds; the version is debug/buildinfo's.
func TestFuncsMatchSymbolTableAndObjdump(t *testing.T) {
	for _, v := range symbolsVariants {
		t.Run(v.String(), func(t *testing.T) {
			path := gotlsdemo.Build(t, gotlsdemo.DemoSource(), v)
			f, b := open(t, path)
			bi, err := buildinfo.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			wantArch := v.Arch
			if wantArch == "" {
				wantArch = "amd64"
			}
			if b.GoVersion != bi.GoVersion || b.Arch != wantArch {
				t.Errorf("version %s arch %s, want %s %s", b.GoVersion, b.Arch, bi.GoVersion, wantArch)
			}
			if v.Go != "" && b.GoVersion != v.Go {
				t.Errorf("version %s, built with %s", b.GoVersion, v.Go)
			}
			funcs, err := b.Funcs(connWrite, connRead, "main.main", "no.such.func")
			if err != nil {
				t.Fatal(err)
			}
			if len(funcs) != 3 || funcs["no.such.func"] != nil {
				t.Fatalf("found %d functions: %v", len(funcs), funcs)
			}
			syms, err := f.Symbols()
			if err != nil {
				t.Fatal(err)
			}
			objdump := objdumpFuncs(t, path)
			for name, fn := range funcs {
				i := slices.IndexFunc(syms, func(s elf.Symbol) bool { return s.Name == name })
				if i < 0 {
					t.Fatalf("%s not in .symtab", name)
				}
				if s := syms[i]; fn.Entry != s.Value || fn.End < s.Value+s.Size || fn.End-(s.Value+s.Size) >= 64 {
					t.Errorf("%s: %#x-%#x, .symtab says %#x+%#x", name, fn.Entry, fn.End, s.Value, s.Size)
				}
				if off := vaddrToOffset(t, f, fn.Entry); fn.EntryOffset != off {
					t.Errorf("%s: entry at file offset %#x, want %#x", name, fn.EntryOffset, off)
				}
				var rets []uint64
				for _, r := range fn.Returns {
					rets = append(rets, r-fn.EntryOffset+fn.Entry)
				}
				want := objdump[name]
				if want == nil || len(want.rets) == 0 || !slices.Equal(rets, want.rets) {
					t.Fatalf("%s: RETs at %#x, objdump lists %+v", name, rets, want)
				}
				if body := fn.BodyOffset - fn.EntryOffset + fn.Entry; body != want.body || body == fn.Entry {
					t.Errorf("%s: body at %#x, objdump shows the stack check's branch before %#x", name, body, want.body)
				}
				t.Logf("%s: entry %#x (file %#x), %d RETs", name, fn.Entry, fn.EntryOffset, len(fn.Returns))
			}
			if ok, err := b.HasPackage("crypto/tls"); !ok || err != nil {
				t.Errorf("HasPackage(crypto/tls) = %v, %v", ok, err)
			}
		})
	}
}

// TestStrippedSameAsUnstripped: -trimpath -ldflags=-s -w leaves no .symtab,
// yet the analysis finds the same code (same RETs relative to the entry)
// and version, with the machine's Go and the older release.
func TestStrippedSameAsUnstripped(t *testing.T) {
	for _, v := range []gotlsdemo.Variant{{}, {Go: gotlsdemo.OldGo}} {
		t.Run(v.String(), func(t *testing.T) {
			_, plain := open(t, gotlsdemo.Build(t, gotlsdemo.DemoSource(), v))
			s := v
			s.Stripped = true
			sf, stripped := open(t, gotlsdemo.Build(t, gotlsdemo.DemoSource(), s))
			if _, err := sf.Symbols(); !errors.Is(err, elf.ErrNoSymbols) {
				t.Errorf("stripped build has a symbol table (%v)", err)
			}
			if sf.Section(".debug_info") != nil {
				t.Error("stripped build has DWARF")
			}
			if plain.GoVersion != stripped.GoVersion {
				t.Errorf("versions %s, %s", plain.GoVersion, stripped.GoVersion)
			}
			pf, err := plain.Funcs(connWrite, connRead)
			if err != nil {
				t.Fatal(err)
			}
			sfs, err := stripped.Funcs(connWrite, connRead)
			if err != nil {
				t.Fatal(err)
			}
			for _, name := range []string{connWrite, connRead} {
				p, s := pf[name], sfs[name]
				if p == nil || s == nil {
					t.Fatalf("%s: plain %v, stripped %v", name, p, s)
				}
				if s.End-s.Entry != p.End-p.Entry || !slices.Equal(relative(s), relative(p)) || s.BodyOffset-s.EntryOffset != p.BodyOffset-p.EntryOffset {
					t.Errorf("%s: stripped %d bytes, RETs at %v; plain %d bytes, RETs at %v",
						name, s.End-s.Entry, relative(s), p.End-p.Entry, relative(p))
				}
			}
		})
	}
}

func relative(f *Func) []uint64 {
	var out []uint64
	for _, r := range f.Returns {
		out = append(out, r-f.EntryOffset)
	}
	return out
}

func vaddrToOffset(t *testing.T, f *elf.File, addr uint64) uint64 {
	t.Helper()
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && p.Vaddr <= addr && addr < p.Vaddr+p.Filesz {
			return addr - p.Vaddr + p.Off
		}
	}
	t.Fatalf("%#x in no segment", addr)
	return 0
}

var (
	objdumpText = regexp.MustCompile(`^TEXT (\S+)\(SB\)`)
	objdumpInst = regexp.MustCompile(`^\s+\S+:\d+\s+0x([0-9a-f]+)\s+[0-9a-f]+\s+(\S+)`)
)

// objdumpFunc is what `go tool objdump` (the Go toolchain's disassembler)
// shows of a function: its RET instructions, and the instruction after
// the stack check's branch to morestack (the first JBE or BLS).
type objdumpFunc struct {
	rets []uint64
	body uint64
}

// objdumpFuncs disassembles (*Conn).Write, Read and main.main.
func objdumpFuncs(t *testing.T, path string) map[string]*objdumpFunc {
	t.Helper()
	out, err := exec.Command("go", "tool", "objdump", "-s", `^(crypto/tls\.\(\*Conn\)\.(Write|Read)|main\.main)$`, path).Output()
	if err != nil {
		t.Fatalf("go tool objdump: %v", err)
	}
	funcs := map[string]*objdumpFunc{}
	var fn *objdumpFunc
	afterCheck := false
	for _, line := range strings.Split(string(out), "\n") {
		if m := objdumpText.FindStringSubmatch(line); m != nil {
			fn = &objdumpFunc{}
			funcs[m[1]] = fn
			afterCheck = false
			continue
		}
		m := objdumpInst.FindStringSubmatch(line)
		if m == nil || fn == nil {
			continue
		}
		a, _ := strconv.ParseUint(m[1], 16, 64)
		if afterCheck {
			fn.body, afterCheck = a, false
		}
		switch m[2] {
		case "RET":
			fn.rets = append(fn.rets, a)
		case "JBE", "BLS":
			afterCheck = fn.body == 0
		}
	}
	return funcs
}

// TestTLSLayoutMatchesDWARF checks the layout table against the DWARF of
// binaries built by the machine's Go and the older release (amd64 and
// arm64), and the *net.TCPConn type hash against the hash in the
// binary's own itab for (*net.TCPConn, net.Conn).
func TestTLSLayoutMatchesDWARF(t *testing.T) {
	for _, v := range []gotlsdemo.Variant{{}, {Go: gotlsdemo.OldGo}, {Arch: "arm64"}} {
		t.Run(v.String(), func(t *testing.T) {
			path := gotlsdemo.Build(t, gotlsdemo.DemoSource(), v)
			f, b := open(t, path)
			l, err := TLSLayoutFor(b.GoVersion)
			if err != nil {
				t.Fatal(err)
			}
			d, err := f.DWARF()
			if err != nil {
				t.Fatal(err)
			}
			fields := structFields(t, d, "crypto/tls.Conn", "net.TCPConn", "net.conn", "net.netFD",
				"internal/poll.FD", "runtime.itab", "internal/abi.ITab")
			itab := "internal/abi.ITab.Hash"
			if _, ok := fields[itab]; !ok {
				itab = "runtime.itab.hash"
			}
			at := func(fs ...string) int64 {
				var sum int64
				for _, f := range fs {
					p, ok := fields[f]
					if !ok {
						t.Fatalf("DWARF has no %s", f)
					}
					sum += p.off
				}
				return sum
			}
			for _, c := range []struct {
				path []string
				size int64 // of the last field
				want uint64
			}{
				{[]string{"crypto/tls.Conn.conn"}, 16, l.ConnConn},
				{[]string{"crypto/tls.Conn.vers"}, 2, l.ConnVers},
				{[]string{"crypto/tls.Conn.isHandshakeComplete"}, 4, l.ConnHandshakeDone},
				{[]string{itab}, 4, l.ITabHash},
				{[]string{"net.TCPConn.conn", "net.conn.fd"}, 8, l.TCPConnFD},
				{[]string{"net.netFD.pfd", "internal/poll.FD.Sysfd"}, 8, l.NetFDSysfd},
			} {
				last := fields[c.path[len(c.path)-1]]
				if got := at(c.path...); uint64(got) != c.want || last.size != c.size {
					t.Errorf("%s at %d (%d bytes), table says %d (%d bytes)", strings.Join(c.path, " + "), got, last.size, c.want, c.size)
				}
			}
			sym := "go:itab.*net.TCPConn,net.Conn"
			hash := readSymbol(t, f, sym, l.ITabHash, 4)
			if h := binary.LittleEndian.Uint32(hash); h != l.TCPConnHash {
				t.Errorf("%s: type hash %#x, table computes %#x", sym, h, l.TCPConnHash)
			}
		})
	}
}

func TestTLSLayoutRefusesUnknownReleases(t *testing.T) {
	for _, v := range []string{"go1.20.14", "go1.18", "go1.27.0", "go1.30rc1"} {
		if _, err := TLSLayoutFor(v); err == nil || !strings.Contains(err.Error(), v) ||
			!strings.Contains(err.Error(), "go1.21 to go1.26") {
			t.Errorf("%s: %v", v, err)
		}
	}
	for _, v := range []string{"go1.21.0", "go1.22.12", "go1.24rc1", "go1.26.8"} {
		if _, err := TLSLayoutFor(v); err != nil {
			t.Errorf("%s: %v", v, err)
		}
	}
}

type fieldPos struct{ off, size int64 }

// structFields returns "struct.field" -> offset and size for the named
// structs.
func structFields(t *testing.T, d *dwarf.Data, names ...string) map[string]fieldPos {
	t.Helper()
	out := map[string]fieldPos{}
	r := d.Reader()
	for {
		e, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		if e == nil {
			return out
		}
		if e.Tag != dwarf.TagStructType {
			continue
		}
		name, _ := e.Val(dwarf.AttrName).(string)
		if !slices.Contains(names, name) {
			r.SkipChildren()
			continue
		}
		typ, err := d.Type(e.Offset)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range typ.(*dwarf.StructType).Field {
			out[name+"."+f.Name] = fieldPos{f.ByteOffset, f.Type.Size()}
		}
		r.SkipChildren()
	}
}

// readSymbol reads n bytes at offset off of a data symbol.
func readSymbol(t *testing.T, f *elf.File, name string, off uint64, n int) []byte {
	t.Helper()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range syms {
		if s.Name != name {
			continue
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_LOAD && p.Vaddr <= s.Value && s.Value < p.Vaddr+p.Filesz {
				buf := make([]byte, n)
				if _, err := p.ReadAt(buf, int64(s.Value-p.Vaddr+off)); err != nil {
					t.Fatal(err)
				}
				return buf
			}
		}
	}
	t.Fatalf("no symbol %s", name)
	return nil
}

// TestNotGoAndNoTLS: ELF files that are not Go programs are refused from
// their section headers; a Go program without crypto/tls analyses fine
// but has neither the package nor the functions.
func TestNotGoAndNoTLS(t *testing.T) {
	for _, p := range []string{"/bin/true", "/usr/bin/env"} {
		f, err := elf.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Open(f); !errors.Is(err, ErrNotGo) {
			t.Errorf("%s: %v, want ErrNotGo", p, err)
		}
		f.Close()
	}
	_, b := open(t, gotlsdemo.Build(t, gotlsdemo.NoTLSSource, gotlsdemo.Variant{Stripped: true}))
	if ok, err := b.HasPackage("crypto/tls"); ok || err != nil {
		t.Errorf("HasPackage(crypto/tls) = %v, %v", ok, err)
	}
	funcs, err := b.Funcs(connWrite, connRead)
	if err != nil || len(funcs) != 0 {
		t.Errorf("Funcs = %v, %v", funcs, err)
	}
	if funcs, err := b.Funcs("main.main"); err != nil || funcs["main.main"] == nil {
		t.Errorf("main.main: %v, %v", funcs, err)
	}
}

// shortReader is a file cut at limit (reads beyond it fail), except for
// the ranges in keep, which stay readable (the ELF, program and section
// headers and the section names, so that the ELF file still opens).
type shortReader struct {
	r     io.ReaderAt
	limit int64
	keep  [][2]int64
}

func (s shortReader) ReadAt(p []byte, off int64) (int, error) {
	for _, k := range s.keep {
		if off >= k[0] && off+int64(len(p)) <= k[1] {
			return s.r.ReadAt(p, off)
		}
	}
	if off >= s.limit {
		return 0, io.ErrUnexpectedEOF
	}
	if off+int64(len(p)) > s.limit {
		n, _ := s.r.ReadAt(p[:s.limit-off], off)
		return n, io.ErrUnexpectedEOF
	}
	return s.r.ReadAt(p, off)
}

// TestTruncatedOrCorrupt: a Go binary cut short or with a damaged symbol
// table gives an error that says what could not be read, never a panic or
// a function at a made-up place.
func TestTruncatedOrCorrupt(t *testing.T) {
	path := gotlsdemo.Build(t, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	pcln := f.Section(".gopclntab")
	shoff := int64(binary.LittleEndian.Uint64(data[0x28:]))
	shend := shoff + int64(binary.LittleEndian.Uint16(data[0x3a:]))*int64(binary.LittleEndian.Uint16(data[0x3c:]))
	shstr := f.Sections[binary.LittleEndian.Uint16(data[0x3e:])]
	keep := [][2]int64{{0, shend}, {int64(shstr.Offset), int64(shstr.Offset + shstr.Size)}}

	// Cut at 60% (the build info is gone too), or inside the symbol
	// table, in the names or in the function table.
	bi := f.Section(".go.buildinfo")
	for _, c := range []struct {
		cut      int64
		keepInfo bool
		want     string
	}{
		{int64(len(data)) * 6 / 10, false, ".go.buildinfo"},
		{int64(pcln.Offset) + 16, true, ".gopclntab"},
		{int64(pcln.Offset) + int64(binary.LittleEndian.Uint64(data[pcln.Offset+8+7*8:])) + 1000, true, ".gopclntab function table"},
	} {
		k := keep
		if c.keepInfo {
			// Only the symbol table is cut.
			k = append(k, [2]int64{int64(bi.Offset), int64(bi.Offset + bi.Size)},
				[2]int64{int64(pcln.Offset + pcln.Size), int64(len(data))})
		}
		sf, err := elf.NewFile(shortReader{bytes.NewReader(data), c.cut, k})
		if err != nil {
			t.Fatal(err)
		}
		b, err := Open(sf)
		if err == nil {
			_, err = b.Funcs(connWrite, connRead)
		}
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "EOF") {
			t.Errorf("cut at %#x: %v, want an EOF error naming %s", c.cut, err, c.want)
		}
		t.Logf("cut at %#x: %v", c.cut, err)
	}

	corrupt := func(mod func(b []byte)) error {
		c := bytes.Clone(data)
		mod(c[pcln.Offset : pcln.Offset+pcln.Size])
		cf, err := elf.NewFile(bytes.NewReader(c))
		if err != nil {
			return err
		}
		b, err := Open(cf)
		if err != nil {
			return err
		}
		_, err = b.Funcs(connWrite, connRead)
		return err
	}
	for name, mod := range map[string]func([]byte){
		"magic":      func(b []byte) { b[0] = 0 },
		"nfunc":      func(b []byte) { binary.LittleEndian.PutUint64(b[8:], 1<<40) },
		"text start": func(b []byte) { binary.LittleEndian.PutUint64(b[24:], 0x10) },
		"functab": func(b []byte) {
			ft := binary.LittleEndian.Uint64(b[8+7*8:])
			for i := ft; i < ft+8*4000 && i < uint64(len(b)); i++ {
				b[i] = 0xff
			}
		},
	} {
		err := corrupt(mod)
		if err == nil {
			t.Errorf("%s: no error", name)
		}
		t.Logf("%s: %v", name, err)
	}
	// Random damage anywhere in the header and the function table: errors
	// or results, never a panic.
	rng := rand.New(rand.NewPCG(1, 2))
	ft := binary.LittleEndian.Uint64(data[pcln.Offset+8+7*8:])
	for i := 0; i < 300; i++ {
		_ = corrupt(func(b []byte) {
			for k := 0; k < 8; k++ {
				var at uint64
				if rng.IntN(2) == 0 {
					at = rng.Uint64N(72)
				} else {
					at = ft + rng.Uint64N(uint64(len(b))-ft)
				}
				b[at] = byte(rng.Uint32())
			}
		})
	}
}

// TestSkipsOtherVersions: binaries of Go releases before 1.18 are refused
// by version, before their symbol table is read.
func TestSkipsOtherVersions(t *testing.T) {
	path := gotlsdemo.Build(t, gotlsdemo.NoTLSSource, gotlsdemo.Variant{Stripped: true})
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	bi := f.Section(".go.buildinfo")
	for _, v := range []string{"go1.17.1", "devel x"} {
		c := bytes.Clone(data)
		at := int(bi.Offset) + 32
		l, k := binary.Uvarint(c[at:])
		if int(l) < len(v) {
			t.Fatalf("version field of %d bytes", l)
		}
		copy(c[at+k:], fmt.Sprintf("%-*s", int(l), v)[:l])
		c[at] = byte(len(v)) // shorter: the rest is ignored
		cf, err := elf.NewFile(bytes.NewReader(c))
		if err != nil {
			t.Fatal(err)
		}
		_, err = Open(cf)
		if err == nil || !strings.Contains(err.Error(), strings.TrimSpace(v)) {
			t.Errorf("%s: %v", v, err)
		}
		t.Logf("%s: %v", v, err)
	}
}

func TestMain(m *testing.M) {
	if _, err := exec.LookPath("go"); err != nil {
		fmt.Fprintln(os.Stderr, "gobin tests need the go command:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// BenchmarkAnalyze is the cost of analysing one executable file that the
// uprobe manager offers: a Go program with crypto/tls (Open and Funcs:
// version, symbol table, code of (*Conn).Write and Read): the stripped
// demo, and kube-apiserver (99 MB) when the test bed has built it; and an
// ELF file of another language (Open only: the section headers). The file
// is parsed by debug/elf once per iteration, as the manager does.
func BenchmarkAnalyze(b *testing.B) {
	for _, c := range []struct{ name, path string }{
		{"go-demo", gotlsdemo.Build(b, gotlsdemo.DemoSource(), gotlsdemo.Variant{Stripped: true})},
		{"go-kube-apiserver", filepath.Join(gotlsdemo.CacheDir(), "kube-apiserver-v1.35.4", "kube-apiserver")},
		{"not-go-bash", "/usr/bin/bash"},
	} {
		b.Run(c.name, func(b *testing.B) {
			if _, err := os.Stat(c.path); err != nil {
				b.Skip(err)
			}
			for b.Loop() {
				f, err := elf.Open(c.path)
				if err != nil {
					b.Fatal(err)
				}
				bin, err := Open(f)
				if err == nil {
					_, err = bin.Funcs(connWrite, connRead)
				}
				if err != nil && !errors.Is(err, ErrNotGo) {
					b.Fatal(err)
				}
				f.Close()
			}
		})
	}
}
