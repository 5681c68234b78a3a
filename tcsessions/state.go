package tcsessions

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// stateFile records the clsact qdiscs Clovisor made, so that a later
// instance (after a crash) removes those and no other. It lives on a file
// system that outlives the agent's process (/run: until reboot, when the
// qdiscs are gone too).
type stateFile struct {
	mu   sync.Mutex
	path string
}

// qdiscRecord names an interface whose clsact qdisc Clovisor made. Both the
// index and the name must match: an index reused by a new interface does
// not count.
type qdiscRecord struct {
	Ifindex int    `json:"ifindex"`
	Name    string `json:"name"`
}

type stateData struct {
	Qdiscs []qdiscRecord `json:"clsactQdiscs"`
}

func newStateFile(dir string) *stateFile {
	return &stateFile{path: filepath.Join(dir, "tc-state.json")}
}

func (s *stateFile) read() (stateData, error) {
	var d stateData
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return d, nil
	}
	if err != nil {
		return d, err
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("%s: %w", s.path, err)
	}
	return d, nil
}

// write replaces the file atomically (removing it when there is nothing to
// record).
func (s *stateFile) write(d stateData) error {
	if len(d.Qdiscs) == 0 {
		err := os.Remove(s.path)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	sort.Slice(d.Qdiscs, func(i, j int) bool { return d.Qdiscs[i].Ifindex < d.Qdiscs[j].Ifindex })
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	tmp := s.path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return fmt.Errorf("writing %s: %w", s.path, err)
	}
	return nil
}

// records returns the recorded qdiscs.
func (s *stateFile) records() ([]qdiscRecord, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.read()
	return d.Qdiscs, err
}

// add records a qdisc about to be made.
func (s *stateFile) add(ifindex int, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.read()
	if err != nil {
		return err
	}
	kept := d.Qdiscs[:0]
	for _, r := range d.Qdiscs {
		if r.Ifindex != ifindex {
			kept = append(kept, r)
		}
	}
	d.Qdiscs = append(kept, qdiscRecord{Ifindex: ifindex, Name: name})
	return s.write(d)
}

// remove forgets the qdisc of an interface.
func (s *stateFile) remove(ifindex int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d, err := s.read()
	if err != nil {
		return err
	}
	kept := d.Qdiscs[:0]
	for _, r := range d.Qdiscs {
		if r.Ifindex != ifindex {
			kept = append(kept, r)
		}
	}
	if len(kept) == len(d.Qdiscs) {
		return nil
	}
	d.Qdiscs = kept
	return s.write(d)
}
