package podmap

import (
	"net/netip"
	"sync/atomic"

	"github.com/clovisor/clovisor/spans"
)

// Index answers the span exporter's questions (spans.Enricher) from the
// latest reconciled state: which container a cgroup ID is, which pod a
// veth or a local address belongs to, who a peer address is. It is
// replaced whole (Set) and read without locks.
type Index struct {
	cur atomic.Pointer[IndexData]
}

// IndexData is one immutable generation of an Index.
type IndexData struct {
	// ByCgroup maps cgroup IDs of traced containers to their identity.
	ByCgroup map[uint64]*spans.K8s
	// ByInterface maps pod veths (node side) to their pod's identity.
	ByInterface map[string]*spans.K8s
	// ByIP maps local pods' addresses to their pod's identity.
	ByIP map[netip.Addr]*spans.K8s
	// Peers names pods and Services by address.
	Peers map[netip.Addr]*spans.K8sPeer
	// Hints names the protocol of servers (pod IP:port, cluster IP:port)
	// where a Service port name or an override gives one.
	Hints map[netip.AddrPort]string
}

// Set replaces the index's data; d must not change afterwards.
func (ix *Index) Set(d *IndexData) { ix.cur.Store(d) }

// Data returns the current generation (nil before the first Set).
func (ix *Index) Data() *IndexData { return ix.cur.Load() }

// Workload implements spans.Enricher.
func (ix *Index) Workload(s *spans.Session) *spans.K8s {
	d := ix.cur.Load()
	if d == nil {
		return nil
	}
	if s.Wire == nil {
		return d.ByCgroup[s.CgroupID]
	}
	if s.Point == spans.PointPodVeth {
		if k := d.ByInterface[s.Wire.Interface]; k != nil {
			return k
		}
	}
	if k := d.ByIP[s.Server.Addr().Unmap()]; k != nil {
		return k
	}
	return d.ByIP[s.Client.Addr().Unmap()]
}

// Peer implements spans.Enricher.
func (ix *Index) Peer(a netip.Addr) *spans.K8sPeer {
	d := ix.cur.Load()
	if d == nil || !a.IsValid() {
		return nil
	}
	return d.Peers[a.Unmap()]
}

// Protocol returns the protocol named for a server address, "" when none
// (sockets.Config.ProtocolHint).
func (ix *Index) Protocol(server netip.AddrPort) string {
	d := ix.cur.Load()
	if d == nil {
		return ""
	}
	return d.Hints[netip.AddrPortFrom(server.Addr().Unmap(), server.Port())]
}
