package testbed

import (
	"bufio"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// BPFObjects are the ids of the BPF programs, maps and links a process
// holds file descriptors to.
type BPFObjects struct {
	Progs, Maps, Links []uint32
}

// Count is the number of objects.
func (o BPFObjects) Count() int { return len(o.Progs) + len(o.Maps) + len(o.Links) }

// BPFObjectsOf reads the BPF objects process pid holds, from
// /proc/<pid>/fdinfo.
func BPFObjectsOf(pid int) (BPFObjects, error) {
	var o BPFObjects
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fdinfo")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return o, err
	}
	for _, e := range ents {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		fields := map[string]uint32{}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
				fields[k] = uint32(n)
			}
		}
		f.Close()
		switch {
		case fields["link_id"] != 0:
			o.Links = append(o.Links, fields["link_id"])
		case fields["map_id"] != 0:
			o.Maps = append(o.Maps, fields["map_id"])
		case fields["prog_id"] != 0:
			o.Progs = append(o.Progs, fields["prog_id"])
		}
	}
	return o, nil
}

// StillLoaded returns the objects of o that still exist in the kernel,
// waiting up to timeout for them to go (the kernel frees programs and maps
// after an RCU grace period).
func StillLoaded(o BPFObjects, timeout time.Duration) BPFObjects {
	deadline := time.Now().Add(timeout)
	for {
		var left BPFObjects
		for _, id := range o.Progs {
			if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(id)); !errors.Is(err, os.ErrNotExist) {
				if err == nil {
					p.Close()
				}
				left.Progs = append(left.Progs, id)
			}
		}
		for _, id := range o.Maps {
			if m, err := ebpf.NewMapFromID(ebpf.MapID(id)); !errors.Is(err, os.ErrNotExist) {
				if err == nil {
					m.Close()
				}
				left.Maps = append(left.Maps, id)
			}
		}
		for _, id := range o.Links {
			if l, err := link.NewFromID(link.ID(id)); !errors.Is(err, os.ErrNotExist) {
				if err == nil {
					l.Close()
				}
				left.Links = append(left.Links, id)
			}
		}
		if left.Count() == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}
