package sockets_test

import (
	"github.com/cilium/ebpf/ringbuf"

	"github.com/clovisor/clovisor/probes"
)

func newReader(tr *probes.Tracer) (*ringbuf.Reader, error) { return ringbuf.NewReader(tr.Events) }
