package gobin

import (
	"fmt"

	"golang.org/x/arch/arm64/arm64asm"
	"golang.org/x/arch/x86/x86asm"
)

// findReturns returns the offsets of the RET instructions in a function's
// code. A uprobe must sit on an instruction boundary (one inside an
// instruction would corrupt the program), so on amd64 the code is decoded
// from its entry in one sweep (Go puts no data between instructions there)
// and any byte that does not decode fails the function. On arm64
// instructions are 4 bytes, aligned; words that do not decode are data
// (literal pools) and are skipped.
func findReturns(arch string, code []byte) ([]uint64, error) {
	var rets []uint64
	switch arch {
	case "amd64":
		for i := 0; i < len(code); {
			inst, err := x86asm.Decode(code[i:], 64)
			if err != nil {
				return nil, fmt.Errorf("cannot decode the instruction at +%#x (% x): %w", i, code[i:min(i+8, len(code))], err)
			}
			if inst.Op == x86asm.RET {
				rets = append(rets, uint64(i))
			}
			i += inst.Len
		}
	case "arm64":
		if len(code)%4 != 0 {
			return nil, fmt.Errorf("code of %d bytes, not whole arm64 instructions", len(code))
		}
		for i := 0; i < len(code); i += 4 {
			inst, err := arm64asm.Decode(code[i : i+4])
			if err == nil && inst.Op == arm64asm.RET {
				rets = append(rets, uint64(i))
			}
		}
	default:
		return nil, fmt.Errorf("architecture %s", arch)
	}
	return rets, nil
}

// findBody returns the offset of the first instruction after a Go
// function's stack check (the prologue that calls runtime.morestack and
// starts the function over when the goroutine's stack is too small):
// that instruction runs once per call, with the arguments still in their
// registers, where the entry may run twice. ok is false when the code
// does not start with a stack check Go compilers emit:
//
//	amd64: [LEAQ -x(SP), R12;] CMPQ SP|R12, 16(R14); JBE morestack
//	arm64: MOVD 16(R28), R16; [SUB $x, RSP, R17;] CMP R16, RSP|R17; BLS morestack
//
// (R14 and R28 hold the goroutine, 16 is its stackguard0; the checks write
// only scratch registers and flags.)
func findBody(arch string, code []byte) (int, bool) {
	switch arch {
	case "amd64":
		for i, off := 0, 0; i < 4 && off < len(code); i++ {
			inst, err := x86asm.Decode(code[off:], 64)
			if err != nil {
				return 0, false
			}
			switch inst.Op {
			case x86asm.LEA:
				if inst.Args[0] != x86asm.R12 {
					return 0, false
				}
			case x86asm.CMP:
				m, ok := inst.Args[1].(x86asm.Mem)
				if !ok || m.Base != x86asm.R14 || m.Disp != 16 || (inst.Args[0] != x86asm.RSP && inst.Args[0] != x86asm.R12) {
					return 0, false
				}
			case x86asm.JBE:
				if rel, ok := inst.Args[0].(x86asm.Rel); !ok || rel <= 0 || i == 0 {
					return 0, false
				}
				return off + inst.Len, true
			default:
				return 0, false
			}
			off += inst.Len
		}
	case "arm64":
		for i := 0; i < 4 && 4*i+4 <= len(code); i++ {
			inst, err := arm64asm.Decode(code[4*i : 4*i+4])
			if err != nil {
				return 0, false
			}
			switch inst.Op {
			case arm64asm.LDR:
				m, ok := inst.Args[1].(arm64asm.MemImmediate)
				if i != 0 || inst.Args[0] != arm64asm.X16 || !ok || m.Base != arm64asm.RegSP(arm64asm.X28) {
					return 0, false
				}
			case arm64asm.SUB:
				if inst.Args[0] != arm64asm.X17 && inst.Args[0] != arm64asm.RegSP(arm64asm.X17) {
					return 0, false
				}
			case arm64asm.CMP:
			case arm64asm.B:
				c, ok := inst.Args[0].(arm64asm.Cond)
				rel, ok2 := inst.Args[1].(arm64asm.PCRel)
				if !ok || !ok2 || c.Value != 9 /* LS */ || rel <= 0 || i < 2 {
					return 0, false
				}
				return 4*i + 4, true
			default:
				return 0, false
			}
		}
	}
	return 0, false
}
