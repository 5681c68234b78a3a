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
