package probes

import (
	"debug/elf"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// Where the OpenSSL uprobes go on x86-64. A uprobe traps into the kernel
// at its address (int3), and the kernel then either emulates the
// instruction it replaced (push, call, jmp, nop on current kernels) or
// executes it out of line, single-stepped: a second trap, and the bigger
// part of the cost (about 3.5 µs of the 4.5 µs of an entry and return on
// the build machine, 0.5 µs with an emulated instruction; see
// docs/benchmarks.md). OpenSSL 1.1.1 and 3.x implement SSL_read and
// SSL_read_ex as small wrappers of one internal function,
// ssl_read_internal(s, buf, num, &readbytes), and SSL_write and
// SSL_write_ex (through SSL_write_ex2 since 3.3) of ssl_write_internal(s,
// buf, num, [flags,] &written); the wrappers start with a stack adjustment
// (sub rsp, stepped), the internal functions with pushes of the registers
// they save (emulated). Probing the two internal functions instead of the
// four wrappers reports the same calls with the same arguments and byte
// counts (as the _ex functions report them), for a fraction of the cost.
//
// The internal functions have no symbol in a stripped library: they are
// found from the wrappers' code, and used only when every check holds;
// otherwise the wrappers are probed as before:
//   - the file is x86-64, and OpenSSL 1.1.1 or later by its banner;
//   - the read wrappers (following exported SSL_* functions they call or
//     jump to, one level, also through the library's PLT) have exactly one
//     direct call target in common that is not an SSL_* function or a PLT
//     stub, and so have the write wrappers, and the two differ;
//   - each internal function starts with a push;
//   - at SSL_read's call, the byte count pointer (the fourth argument) is
//     a stack address, and at SSL_write's it is the fourth argument before
//     3.3 and the fifth from 3.3 (after the flags), as the version says.

// opensslInternal is one internal function to probe.
type opensslInternal struct {
	name string // for logs and trace event names
	off  uint64 // file offset
	arg5 bool   // the byte count pointer is the fifth argument
}

// elfFunc is a function symbol.
type elfFunc struct{ addr, size uint64 }

// findOpenSSLInternal returns the internal read and write functions of f,
// or the reason they are not used.
func findOpenSSLInternal(f *elf.File, v opensslVersion) (read, write opensslInternal, err error) {
	if f.Machine != elf.EM_X86_64 || runtime.GOARCH != "amd64" {
		return read, write, errors.New("not x86-64")
	}
	if v.Major == 0 || (v.Major == 1 && (v.Minor < 1 || (v.Minor == 1 && v.Patch < 1))) {
		return read, write, fmt.Errorf("OpenSSL version %q: before 1.1.1 or unknown", v.String())
	}
	syms := map[string]elfFunc{}
	api := map[uint64]bool{} // addresses of SSL_* functions
	look := func(list []elf.Symbol) {
		for _, s := range list {
			if s.Section == elf.SHN_UNDEF || s.Value == 0 || elf.ST_TYPE(s.Info) != elf.STT_FUNC {
				continue
			}
			name, _, _ := strings.Cut(s.Name, "@")
			if !strings.HasPrefix(name, "SSL_") {
				continue
			}
			api[s.Value] = true
			if _, ok := syms[name]; !ok {
				syms[name] = elfFunc{s.Value, s.Size}
			}
		}
	}
	if list, err := f.DynamicSymbols(); err == nil {
		look(list)
	}
	if list, err := f.Symbols(); err == nil {
		look(list)
	}
	var plt [][2]uint64
	for _, s := range f.Sections {
		if s.Name == ".plt" || s.Name == ".plt.got" || s.Name == ".plt.sec" {
			plt = append(plt, [2]uint64{s.Addr, s.Addr + s.Size})
		}
	}
	inPLT := func(a uint64) bool {
		for _, r := range plt {
			if a >= r[0] && a < r[1] {
				return true
			}
		}
		return false
	}
	// The symbols of the GOT slots that PLT stubs jump through (a call
	// of an exported function of the library itself goes through its PLT
	// where the compiler allows interposition, as gcc does with -fPIC).
	gotSym := map[uint64]string{}
	if rela := f.Section(".rela.plt"); rela != nil && rela.Type == elf.SHT_RELA {
		dyn, _ := f.DynamicSymbols()
		if data, err := rela.Data(); err == nil {
			for i := 0; i+24 <= len(data); i += 24 {
				off := f.ByteOrder.Uint64(data[i:])
				sym := f.ByteOrder.Uint64(data[i+8:]) >> 32
				if sym > 0 && int(sym) <= len(dyn) {
					gotSym[off] = dyn[sym-1].Name
				}
			}
		}
	}
	code := func(addr, size uint64) ([]byte, error) {
		for _, p := range f.Progs {
			if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 && addr >= p.Vaddr && addr+size <= p.Vaddr+p.Filesz {
				b := make([]byte, size)
				if _, err := p.ReadAt(b, int64(addr-p.Vaddr)); err != nil {
					return nil, err
				}
				return b, nil
			}
		}
		return nil, fmt.Errorf("code at %#x not in an executable segment", addr)
	}
	// insts decodes a function, in one sweep from its entry.
	type inst struct {
		at uint64
		x86asm.Inst
	}
	decode := func(fn elfFunc) ([]inst, error) {
		if fn.size == 0 || fn.size > 4096 {
			return nil, fmt.Errorf("function of %d bytes", fn.size)
		}
		b, err := code(fn.addr, fn.size)
		if err != nil {
			return nil, err
		}
		var out []inst
		for i := 0; i < len(b); {
			in, err := x86asm.Decode(b[i:], 64)
			if err != nil {
				return nil, fmt.Errorf("cannot decode at %#x: %w", fn.addr+uint64(i), err)
			}
			out = append(out, inst{fn.addr + uint64(i), in})
			i += in.Len
		}
		return out, nil
	}
	// target is the destination of a direct call or jump, else 0.
	target := func(in inst) uint64 {
		if in.Op != x86asm.CALL && in.Op != x86asm.JMP {
			return 0
		}
		if rel, ok := in.Args[0].(x86asm.Rel); ok {
			return uint64(int64(in.at) + int64(in.Len) + int64(rel))
		}
		return 0
	}
	// targets: the direct calls and jumps out of a function.
	targets := func(fn elfFunc) (map[uint64]bool, error) {
		insts, err := decode(fn)
		if err != nil {
			return nil, err
		}
		out := map[uint64]bool{}
		for _, in := range insts {
			if t := target(in); t != 0 && (t < fn.addr || t >= fn.addr+fn.size) {
				out[t] = true
			}
		}
		return out, nil
	}
	byAddr := map[uint64]elfFunc{}
	for _, fn := range syms {
		byAddr[fn.addr] = fn
	}
	// resolve maps a PLT stub of an SSL_* function of the file to the
	// function; ok is false for the stubs of other functions.
	resolve := func(t uint64) (uint64, bool) {
		if !inPLT(t) {
			return t, true
		}
		b, err := code(t, 16)
		if err != nil {
			return 0, false
		}
		for i := 0; i < len(b); {
			in, err := x86asm.Decode(b[i:], 64)
			if err != nil {
				return 0, false
			}
			i += in.Len
			if m, ok := in.Args[0].(x86asm.Mem); ok && in.Op == x86asm.JMP && m.Base == x86asm.RIP {
				name, _, _ := strings.Cut(gotSym[uint64(int64(t)+int64(i)+m.Disp)], "@")
				if fn, ok := syms[name]; ok {
					return fn.addr, true
				}
				return 0, false
			}
		}
		return 0, false
	}
	// reached: the targets of a wrapper, through the SSL_* functions it
	// calls or jumps to (one level), without SSL_* functions and PLT stubs.
	reached := func(name string) (map[uint64]bool, error) {
		fn, ok := syms[name]
		if !ok {
			return nil, fmt.Errorf("no %s", name)
		}
		first, err := targets(fn)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out := map[uint64]bool{}
		for t := range first {
			t, ok := resolve(t)
			if !ok {
				continue
			}
			if !api[t] {
				out[t] = true
				continue
			}
			inner, err := targets(byAddr[t])
			if err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			for u := range inner {
				if u, ok := resolve(u); ok && !api[u] {
					out[u] = true
				}
			}
		}
		return out, nil
	}
	common := func(a, b string) (uint64, error) {
		ra, err := reached(a)
		if err != nil {
			return 0, err
		}
		rb, err := reached(b)
		if err != nil {
			return 0, err
		}
		var both []uint64
		for t := range ra {
			if rb[t] {
				both = append(both, t)
			}
		}
		sort.Slice(both, func(i, j int) bool { return both[i] < both[j] })
		if len(both) != 1 {
			return 0, fmt.Errorf("%s and %s call %d functions in common (%#x), want one", a, b, len(both), both)
		}
		return both[0], nil
	}
	// startsWithPush checks the internal function's first instruction.
	startsWithPush := func(addr uint64) error {
		b, err := code(addr, 16)
		if err != nil {
			return err
		}
		in, err := x86asm.Decode(b, 64)
		if err != nil {
			return err
		}
		if in.Op != x86asm.PUSH {
			return fmt.Errorf("the function at %#x starts with %v, not a push", addr, in)
		}
		return nil
	}
	// stackArg tells which of the fourth and fifth argument registers
	// holds a stack address at the wrapper's call of the internal
	// function: the last write of each before the call.
	stackArg := func(name string, to uint64) (arg4, arg5 bool, err error) {
		insts, err := decode(syms[name])
		if err != nil {
			return false, false, err
		}
		var last4, last5 *inst
		for i := range insts {
			in := &insts[i]
			if target(*in) == to && in.Op == x86asm.CALL {
				fromStack := func(w *inst) bool {
					if w == nil || (w.Op != x86asm.MOV && w.Op != x86asm.LEA) {
						return false
					}
					switch src := w.Args[1].(type) {
					case x86asm.Reg:
						return src == x86asm.RSP
					case x86asm.Mem:
						return w.Op == x86asm.LEA && src.Base == x86asm.RSP
					}
					return false
				}
				return fromStack(last4), fromStack(last5), nil
			}
			if dst, ok := in.Args[0].(x86asm.Reg); ok {
				switch dst {
				case x86asm.RCX, x86asm.ECX:
					last4 = in
				case x86asm.R8, x86asm.R8L:
					last5 = in
				}
			}
		}
		return false, false, fmt.Errorf("no call of %#x in %s", to, name)
	}
	offset := func(addr uint64) (uint64, error) {
		for _, p := range f.Progs {
			if p.Type == elf.PT_LOAD && p.Flags&elf.PF_X != 0 && addr >= p.Vaddr && addr < p.Vaddr+p.Memsz {
				return addr - p.Vaddr + p.Off, nil
			}
		}
		return 0, fmt.Errorf("%#x not in an executable segment", addr)
	}

	r, err := common("SSL_read", "SSL_read_ex")
	if err != nil {
		return read, write, err
	}
	w, err := common("SSL_write", "SSL_write_ex")
	if err != nil {
		return read, write, err
	}
	if r == w {
		return read, write, fmt.Errorf("the read and write wrappers call the same function %#x", r)
	}
	for _, a := range []uint64{r, w} {
		if err := startsWithPush(a); err != nil {
			return read, write, err
		}
	}
	if a4, a5, err := stackArg("SSL_read", r); err != nil || !a4 || a5 {
		return read, write, fmt.Errorf("SSL_read's call of %#x: byte count pointer in the 4th argument %v, in the 5th %v (%v)", r, a4, a5, err)
	}
	wantArg5 := v.Major > 3 || (v.Major == 3 && v.Minor >= 3)
	if a4, a5, err := stackArg("SSL_write", w); err != nil || a4 == a5 || a5 != wantArg5 {
		return read, write, fmt.Errorf("SSL_write's call of %#x: byte count pointer in the 4th argument %v, in the 5th %v (%v), OpenSSL %s", w, a4, a5, err, v)
	}
	ro, err := offset(r)
	if err != nil {
		return read, write, err
	}
	wo, err := offset(w)
	if err != nil {
		return read, write, err
	}
	return opensslInternal{name: "ssl_read_internal", off: ro}, opensslInternal{name: "ssl_write_internal", off: wo, arg5: wantArg5}, nil
}
