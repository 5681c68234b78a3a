// Package gobin reads what uprobes on a Go program need from its ELF file:
// the Go version (from the build info), where functions start and every
// RET instruction inside them (from the Go symbol table, .gopclntab, which
// stays in binaries built with -ldflags=-s -w), and as file offsets, the
// form uprobes take.
//
// It is run on every executable file of traced processes, so Open rejects
// files that are not Go programs from their section headers alone, and
// Funcs reads only the function name and function tables of .gopclntab
// (not the line tables, its bulk).
//
// Supported: ELF files for amd64 and arm64 built by Go 1.18 or later (the
// pclntab formats of Go 1.18 and 1.20, the register ABI), position
// dependent or not, linked internally or externally.
package gobin

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"go/version"
	"io"
)

// ErrNotGo is returned by Open for a file that is not a Go program.
var ErrNotGo = errors.New("not a Go program")

// MinVersion is the oldest Go release whose binaries Open reads: the
// pclntab format of Go 1.18 and the register-based calling convention
// (amd64 since Go 1.17, arm64 since 1.18).
const MinVersion = "go1.18"

// Binary is an analysed Go executable.
type Binary struct {
	// GoVersion is the toolchain that built it, e.g. "go1.22.12".
	GoVersion string
	// Arch is the GOARCH: "amd64" or "arm64".
	Arch string

	f         *elf.File
	pcln      *elf.Section
	ptrSize   int
	nfunc     int
	textField uint64 // the header's text start (0 since Go 1.26)
	textStart uint64 // runtime.text: the base of function entry offsets
	nameOff   uint64 // funcnametab, in .gopclntab
	nameEnd   uint64
	funcOff   uint64 // functab, in .gopclntab
}

// Func is one function of a Go binary.
type Func struct {
	Name string
	// Entry and End are the virtual addresses of the function's first
	// instruction and of the end of its code (the next function's entry).
	Entry, End uint64
	// EntryOffset is Entry as an offset in the file (uprobe addresses).
	EntryOffset uint64
	// BodyOffset is the file offset of the first instruction after the
	// function's stack check: it runs once per call (the entry runs again
	// after the stack grew), with the arguments still in their registers.
	// EntryOffset when the function has no stack check.
	BodyOffset uint64
	// Returns are the file offsets of the function's RET instructions.
	Returns []uint64
}

// sizes a sane function and table may not exceed (corrupt files).
const (
	maxFuncSize  = 1 << 20
	maxTableSize = 1 << 30
)

// Open checks that f is a Go program built by a supported toolchain for
// amd64 or arm64 and reads its build info and symbol table header. It
// returns ErrNotGo (at once, from the section headers) for any other file.
func Open(f *elf.File) (*Binary, error) {
	bi := f.Section(".go.buildinfo")
	pcln := f.Section(".gopclntab")
	if bi == nil && pcln == nil {
		return nil, ErrNotGo
	}
	b := &Binary{f: f, pcln: pcln}
	switch f.Machine {
	case elf.EM_X86_64:
		b.Arch = "amd64"
	case elf.EM_AARCH64:
		b.Arch = "arm64"
	default:
		return nil, fmt.Errorf("Go program for %v: only amd64 and arm64 are supported", f.Machine)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("Go program of class %v, %v: want 64-bit little-endian", f.Class, f.Data)
	}
	if bi == nil {
		return nil, errors.New("Go program without build info (.go.buildinfo): cannot tell its Go version")
	}
	v, err := readVersion(bi)
	if err != nil {
		return nil, fmt.Errorf("reading the Go version from .go.buildinfo: %w", err)
	}
	b.GoVersion = v
	if !version.IsValid(v) {
		return nil, fmt.Errorf("Go version %q: not a release this can check (a development build?)", v)
	}
	if version.Compare(v, MinVersion) < 0 {
		return nil, fmt.Errorf("built by %s: Go binaries before %s (older symbol table format and calling convention) are not supported", v, MinVersion)
	}
	if pcln == nil {
		return nil, fmt.Errorf("built by %s, but has no Go symbol table (.gopclntab section)", v)
	}
	if err := b.readHeader(); err != nil {
		return nil, fmt.Errorf("built by %s: .gopclntab: %w", v, err)
	}
	return b, nil
}

// readVersion reads the Go version from the .go.buildinfo section: since
// Go 1.18 the version string is stored inline (flag 2) after the 32-byte
// header, as a varint length and the bytes.
func readVersion(s *elf.Section) (string, error) {
	const magic = "\xff Go buildinf:"
	hdr := make([]byte, 32)
	if _, err := s.ReadAt(hdr, 0); err != nil {
		return "", fmt.Errorf("header: %w", err)
	}
	if string(hdr[:len(magic)]) != magic {
		return "", errors.New("no build info magic")
	}
	if hdr[15]&2 == 0 {
		return "", fmt.Errorf("build info in the pre-Go 1.18 format (built before %s)", MinVersion)
	}
	buf := make([]byte, 10+64)
	n, err := s.ReadAt(buf, 32)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	buf = buf[:n]
	l, k := binary.Uvarint(buf)
	if k <= 0 || l == 0 || l > 64 || uint64(len(buf)-k) < l {
		return "", errors.New("bad version string length")
	}
	return string(buf[k : k+int(l)]), nil
}

// pclntab header magics (runtime/symtab.go).
const (
	magic118 = 0xfffffff0 // Go 1.18, 1.19
	magic120 = 0xfffffff1 // Go 1.20 and later
)

// readHeader reads the pcHeader at the start of .gopclntab:
//
//	magic uint32; pad1, pad2, minLC, ptrSize uint8
//	nfunc int; nfiles uint; textStart uintptr
//	funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset uintptr
func (b *Binary) readHeader() error {
	hdr := make([]byte, 8+8*8)
	if _, err := b.pcln.ReadAt(hdr, 0); err != nil {
		return fmt.Errorf("header: %w", err)
	}
	le := binary.LittleEndian
	switch m := le.Uint32(hdr); m {
	case magic118, magic120:
	default:
		return fmt.Errorf("unknown header magic %#x", m)
	}
	b.ptrSize = int(hdr[7])
	if hdr[4] != 0 || hdr[5] != 0 || b.ptrSize != 8 {
		return fmt.Errorf("bad header (pointer size %d)", b.ptrSize)
	}
	word := func(i int) uint64 { return le.Uint64(hdr[8+8*i:]) }
	nfunc := word(0)
	size := b.pcln.Size
	b.nameOff, b.nameEnd, b.funcOff = word(3), word(4), word(7)
	if nfunc == 0 || nfunc > maxTableSize/8 || size > maxTableSize ||
		b.nameOff > b.nameEnd || b.nameEnd > size || b.funcOff >= size || (nfunc+1)*8 > size-b.funcOff {
		return fmt.Errorf("bad header: %d functions, names at %#x-%#x, function table at %#x, section size %#x",
			nfunc, b.nameOff, b.nameEnd, b.funcOff, size)
	}
	b.nfunc = int(nfunc)
	b.textField = word(2)
	return nil
}

// readTextStart finds runtime.text, the base of the entry offsets in the
// function table. Go 1.18 to 1.25 store it in the header (in
// position-independent executables as a dynamic relocation of the field);
// Go 1.26 no longer does, and the runtime takes it from its module data
// (runtime.firstmoduledata), found here as the word pointing at the
// header that is followed by a slice of the function name table.
func (b *Binary) readTextStart(field uint64) (uint64, error) {
	var relocs map[uint64]uint64
	if b.f.Type == elf.ET_DYN {
		var err error
		if relocs, err = b.relativeRelocs(); err != nil {
			return 0, err
		}
		if v, ok := relocs[b.pcln.Addr+8+2*uint64(b.ptrSize)]; ok {
			field = v
		}
	}
	start := field
	if start == 0 {
		md, err := b.findModuledata(relocs)
		if err != nil {
			return 0, err
		}
		if start, err = b.word(relocs, md+mdText); err != nil {
			return 0, fmt.Errorf("module data at %#x: %w", md, err)
		}
	}
	if _, err := b.fileOffset(start); err != nil {
		return 0, fmt.Errorf("%#x: %w", start, err)
	}
	return start, nil
}

// Offsets in runtime.moduledata (the same from Go 1.16 to at least 1.26):
// pcHeader *pcHeader, then the slices funcnametab, cutab, filetab, pctab,
// pclntable, ftab, then findfunctab, minpc, maxpc, text.
const (
	mdFuncnametab = 8
	mdText        = 8 + 6*24 + 8 + 2*8
)

// findModuledata returns the address of the module data: a pointer to the
// pcHeader followed by the funcnametab slice {pointer, length}. In
// position-dependent files the pointers are in the file, in writable data;
// in position-independent ones they are relocations.
func (b *Binary) findModuledata(relocs map[uint64]uint64) (uint64, error) {
	names, namesLen := b.pcln.Addr+b.nameOff, b.nameEnd-b.nameOff
	ok := func(md uint64) bool {
		p, err1 := b.word(relocs, md+mdFuncnametab)
		n, err2 := b.word(relocs, md+mdFuncnametab+8)
		return err1 == nil && err2 == nil && p == names && n == namesLen
	}
	if relocs != nil {
		for at, v := range relocs {
			if v == b.pcln.Addr && ok(at) {
				return at, nil
			}
		}
	}
	want := make([]byte, 8)
	binary.LittleEndian.PutUint64(want, b.pcln.Addr)
	for _, s := range b.f.Sections {
		if s.Type != elf.SHT_PROGBITS || s.Flags&(elf.SHF_ALLOC|elf.SHF_WRITE) != elf.SHF_ALLOC|elf.SHF_WRITE || s.Size > maxTableSize {
			continue
		}
		data, err := s.Data()
		if err != nil {
			return 0, fmt.Errorf("reading %s: %w", s.Name, err)
		}
		for i := 0; i+8 <= len(data); i += 8 {
			if bytes.Equal(data[i:i+8], want) && ok(s.Addr+uint64(i)) {
				return s.Addr + uint64(i), nil
			}
		}
	}
	return 0, errors.New("not in the header, and no module data points at the header")
}

// word reads the 64-bit word at virtual address addr: its relocation's
// value if it has one, else the file's content.
func (b *Binary) word(relocs map[uint64]uint64, addr uint64) (uint64, error) {
	if v, ok := relocs[addr]; ok {
		return v, nil
	}
	for _, p := range b.f.Progs {
		if p.Type == elf.PT_LOAD && p.Vaddr <= addr && addr+8 <= p.Vaddr+p.Filesz {
			var w [8]byte
			if _, err := p.ReadAt(w[:], int64(addr-p.Vaddr)); err != nil {
				return 0, err
			}
			return binary.LittleEndian.Uint64(w[:]), nil
		}
	}
	return 0, fmt.Errorf("address %#x is not in the file", addr)
}

// relativeRelocs reads the R_*_RELATIVE relocations of the file's
// SHT_RELA sections: address -> value.
func (b *Binary) relativeRelocs() (map[uint64]uint64, error) {
	relative := uint32(elf.R_X86_64_RELATIVE)
	if b.f.Machine == elf.EM_AARCH64 {
		relative = uint32(elf.R_AARCH64_RELATIVE)
	}
	relocs := map[uint64]uint64{}
	for _, s := range b.f.Sections {
		if s.Type != elf.SHT_RELA || s.Size > maxTableSize {
			continue
		}
		// Elf64_Rela: r_offset, r_info, r_addend.
		const entSize = 24
		buf := make([]byte, 64*1024/entSize*entSize)
		for off := uint64(0); off < s.Size; off += uint64(len(buf)) {
			n, err := s.ReadAt(buf, int64(off))
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("reading relocations %s: %w", s.Name, err)
			}
			for i := 0; i+entSize <= n; i += entSize {
				e := buf[i : i+entSize]
				if elf.R_TYPE64(binary.LittleEndian.Uint64(e[8:])) == relative {
					relocs[binary.LittleEndian.Uint64(e)] = binary.LittleEndian.Uint64(e[16:])
				}
			}
			if n < len(buf) {
				break
			}
		}
	}
	return relocs, nil
}

// textSegment returns the executable PT_LOAD segment holding the virtual
// address addr.
func (b *Binary) textSegment(addr uint64) (*elf.Prog, error) {
	for _, p := range b.f.Progs {
		if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 && p.Vaddr <= addr && addr < p.Vaddr+p.Filesz {
			return p, nil
		}
	}
	return nil, fmt.Errorf("address %#x is in no executable segment of the file", addr)
}

// fileOffset converts a virtual address of code to its offset in the file.
func (b *Binary) fileOffset(addr uint64) (uint64, error) {
	p, err := b.textSegment(addr)
	if err != nil {
		return 0, err
	}
	return addr - p.Vaddr + p.Off, nil
}

// chunkSize is how much of a table is read at a time: the tables of a
// large program are tens of MB, which are never held whole.
const chunkSize = 1 << 20

// scanNames streams the function name table (NUL-terminated names) and
// returns, for each pattern, the table offset of its first match (-1:
// none). Patterns are matched as bytes, across chunk boundaries.
func (b *Binary) scanNames(pats [][]byte) ([]int64, error) {
	found := make([]int64, len(pats))
	overlap := 0
	for i := range found {
		found[i] = -1
		overlap = max(overlap, len(pats[i])-1)
	}
	size := int64(b.nameEnd - b.nameOff)
	chunk := min(int64(chunkSize), size)
	buf := make([]byte, chunk+int64(overlap))
	for off := int64(0); off < size; off += chunk {
		n := min(int64(len(buf)), size-off)
		if _, err := b.pcln.ReadAt(buf[:n], int64(b.nameOff)+off); err != nil {
			return nil, fmt.Errorf(".gopclntab function names: %w", err)
		}
		left := 0
		for i, p := range pats {
			if found[i] < 0 {
				if j := bytes.Index(buf[:n], p); j >= 0 {
					found[i] = off + int64(j)
				} else {
					left++
				}
			}
		}
		if left == 0 {
			break
		}
	}
	return found, nil
}

// nameOffsets returns where each of names starts in the function name
// table (names are stored once each, after the NUL ending the previous
// one, or at the start).
func (b *Binary) nameOffsets(names []string) (map[uint32]string, error) {
	var pats [][]byte
	for _, n := range names {
		pats = append(pats, []byte("\x00"+n+"\x00"))
	}
	at, err := b.scanNames(pats)
	if err != nil {
		return nil, err
	}
	first := make([]byte, 256)
	k, err := b.pcln.ReadAt(first[:min(int64(len(first)), int64(b.nameEnd-b.nameOff))], int64(b.nameOff))
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf(".gopclntab function names: %w", err)
	}
	found := map[uint32]string{}
	for i, n := range names {
		switch {
		case bytes.HasPrefix(first[:k], []byte(n+"\x00")):
			found[0] = n
		case at[i] >= 0:
			found[uint32(at[i]+1)] = n
		}
	}
	return found, nil
}

// HasPackage reports whether the symbol table names a function of the
// package with this import path (also one inlined into others).
func (b *Binary) HasPackage(path string) (bool, error) {
	at, err := b.scanNames([][]byte{[]byte("\x00" + path + ".")})
	if err != nil {
		return false, err
	}
	if at[0] >= 0 {
		return true, nil
	}
	first := make([]byte, len(path)+1)
	if uint64(len(first)) > b.nameEnd-b.nameOff {
		return false, nil
	}
	if _, err := b.pcln.ReadAt(first, int64(b.nameOff)); err != nil {
		return false, fmt.Errorf(".gopclntab function names: %w", err)
	}
	return string(first) == path+".", nil
}

// Funcs finds the named functions (as the symbol table names them, e.g.
// "crypto/tls.(*Conn).Write") and the RET instructions in each. Functions
// not in the binary (never linked in, or always inlined) are missing from
// the map; an error means the table or the code could not be read.
func (b *Binary) Funcs(names ...string) (map[string]*Func, error) {
	want, err := b.nameOffsets(names)
	if err != nil {
		return nil, err
	}
	out := map[string]*Func{}
	if len(want) == 0 {
		return out, nil
	}
	if b.textStart == 0 {
		start, err := b.readTextStart(b.textField)
		if err != nil {
			return nil, fmt.Errorf("finding the text start: %w", err)
		}
		b.textStart = start
	}
	// functab: nfunc+1 pairs {entryoff, funcoff uint32}, the last one
	// marking the end of the text; each _func (at functab + funcoff)
	// starts with {entryOff uint32, nameOff int32}. The _funcs follow
	// the table, in its order: they are read through a window that
	// moves along.
	ftab := make([]byte, 8*(b.nfunc+1))
	if _, err := b.pcln.ReadAt(ftab, int64(b.funcOff)); err != nil {
		return nil, fmt.Errorf(".gopclntab function table: %w", err)
	}
	region := b.pcln.Size - b.funcOff
	win := &window{s: b.pcln, base: b.funcOff, size: region, buf: make([]byte, 64<<10)}
	le := binary.LittleEndian
	for i := 0; i < b.nfunc; i++ {
		entry, funcoff := le.Uint32(ftab[8*i:]), le.Uint32(ftab[8*i+4:])
		if uint64(funcoff)+8 > region {
			return nil, fmt.Errorf(".gopclntab: function %d of %d at %#x, beyond the table", i, b.nfunc, funcoff)
		}
		hdr, err := win.at(uint64(funcoff), 8)
		if err != nil {
			return nil, fmt.Errorf(".gopclntab function table: %w", err)
		}
		name, ok := want[le.Uint32(hdr[4:])]
		if !ok {
			continue
		}
		if le.Uint32(hdr) != entry {
			return nil, fmt.Errorf(".gopclntab: %s: entries disagree (%#x, %#x)", name, entry, le.Uint32(hdr))
		}
		end := le.Uint32(ftab[8*(i+1):])
		if end <= entry || end-entry > maxFuncSize {
			return nil, fmt.Errorf(".gopclntab: %s: bad extent %#x-%#x", name, entry, end)
		}
		fn, err := b.function(name, b.textStart+uint64(entry), b.textStart+uint64(end))
		if err != nil {
			return nil, err
		}
		out[name] = fn
	}
	return out, nil
}

// window reads small pieces of a section region at offsets that mostly
// grow, a buffer at a time.
type window struct {
	s          *elf.Section
	base, size uint64 // the region in the section
	buf        []byte
	start, n   uint64 // what buf holds: region offsets [start, start+n)
}

// at returns the n bytes at region offset off.
func (w *window) at(off uint64, n int) ([]byte, error) {
	if off < w.start || off+uint64(n) > w.start+w.n {
		w.start = off
		w.n = min(uint64(len(w.buf)), w.size-off)
		if w.n < uint64(n) {
			return nil, io.ErrUnexpectedEOF
		}
		if _, err := w.s.ReadAt(w.buf[:w.n], int64(w.base+off)); err != nil {
			return nil, err
		}
	}
	return w.buf[off-w.start : off-w.start+uint64(n)], nil
}

// function reads a function's code and finds its RET instructions.
func (b *Binary) function(name string, entry, end uint64) (*Func, error) {
	p, err := b.textSegment(entry)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if end > p.Vaddr+p.Filesz {
		return nil, fmt.Errorf("%s: code %#x-%#x runs past its segment", name, entry, end)
	}
	code := make([]byte, end-entry)
	if _, err := p.ReadAt(code, int64(entry-p.Vaddr)); err != nil {
		return nil, fmt.Errorf("%s: reading code: %w", name, err)
	}
	rets, err := findReturns(b.Arch, code)
	if err != nil {
		return nil, fmt.Errorf("%s at %#x: %w", name, entry, err)
	}
	if len(rets) == 0 {
		return nil, fmt.Errorf("%s at %#x: no RET instruction found", name, entry)
	}
	fileOff := entry - p.Vaddr + p.Off
	fn := &Func{Name: name, Entry: entry, End: end, EntryOffset: fileOff, BodyOffset: fileOff}
	if body, ok := findBody(b.Arch, code); ok {
		fn.BodyOffset += uint64(body)
	}
	for _, r := range rets {
		fn.Returns = append(fn.Returns, fileOff+r)
	}
	return fn, nil
}
