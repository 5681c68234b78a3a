package tcsessions

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// CleanupReport counts the stale objects of an earlier instance that were
// removed.
type CleanupReport struct {
	// Links are tcx links pinned in Config.PinDir.
	Links int
	// Filters are Clovisor's cls_bpf filters (FilterHandle and a name
	// starting with FilterNamePrefix).
	Filters int
	// Qdiscs are clsact qdiscs the state file says Clovisor made, removed
	// once empty.
	Qdiscs int
}

// Cleanup removes what an earlier instance with this configuration left in
// the kernel (after a crash or SIGKILL): tcx links pinned in cfg.PinDir,
// Clovisor's cls_bpf filters on every interface of the namespace, and the
// clsact qdiscs the state file in cfg.StateDir names, when no filter is
// left on them. Other tools' filters and qdiscs are never touched. Open
// does this before attaching.
func Cleanup(cfg Config) (CleanupReport, error) {
	if err := cfg.normalize(); err != nil {
		return CleanupReport{}, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return CleanupReport{}, fmt.Errorf("raising the memlock limit: %w", err)
	}
	ns, err := newNSWorker(cfg.Netns)
	if err != nil {
		return CleanupReport{}, err
	}
	defer ns.close()
	return cleanupStale(&cfg, ns, newStateFile(cfg.StateDir), cfg.Logger.With("component", "tcsessions"))
}

func cleanupStale(cfg *Config, ns *nsWorker, state *stateFile, log *slog.Logger) (CleanupReport, error) {
	var r CleanupReport
	var errs []error

	// Pinned tcx links: detach, unpin.
	if cfg.PinDir != "" {
		ents, err := os.ReadDir(cfg.PinDir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("reading the pin directory: %w", err))
		}
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), pinPrefix) {
				continue
			}
			p := filepath.Join(cfg.PinDir, e.Name())
			l, err := link.LoadPinnedLink(p, nil)
			if err != nil {
				// Not a link (any more): the name is ours, remove it.
				if rerr := os.Remove(p); rerr != nil {
					errs = append(errs, fmt.Errorf("removing stale pin %s: %w (%v)", p, rerr, err))
				}
				continue
			}
			if err := l.Detach(); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOLINK) {
				log.Info("detaching a stale tcx link", "pin", p, "error", err.Error())
			}
			if err := l.Unpin(); err != nil {
				errs = append(errs, fmt.Errorf("unpinning stale link %s: %w", p, err))
			}
			l.Close()
			r.Links++
			log.Info("removed a stale tcx link", "pin", p)
		}
	}

	// Our filters, on every interface.
	links, err := ns.nl.LinkList()
	if err != nil {
		return r, fmt.Errorf("listing interfaces: %w", err)
	}
	for _, lk := range links {
		for _, h := range hooks {
			mine, err := ourFilters(ns.nl, lk, h.parent)
			if err != nil {
				// No clsact qdisc: nothing of ours here.
				continue
			}
			for _, f := range mine {
				if err := deleteFilter(ns.nl, f); err != nil {
					errs = append(errs, err)
					continue
				}
				r.Filters++
				log.Info("removed a stale filter", "interface", lk.Attrs().Name, "hook", h.name,
					"priority", f.Priority, "name", f.Name)
			}
		}
	}

	// The qdiscs we made, once empty.
	recs, err := state.records()
	if err != nil {
		errs = append(errs, fmt.Errorf("reading the state file: %w", err))
	}
	for _, rec := range recs {
		lk, err := ns.nl.LinkByIndex(rec.Ifindex)
		if err == nil && lk.Attrs().Name == rec.Name {
			removed, err := removeQdiscIfEmpty(ns.nl, rec.Ifindex)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if removed {
				r.Qdiscs++
				log.Info("removed a stale clsact qdisc", "interface", rec.Name)
			} else {
				log.Info("stale clsact qdisc left in place: other filters use it", "interface", rec.Name)
			}
		}
		if err := state.remove(rec.Ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	return r, errors.Join(errs...)
}

// defaultRouteLinks returns the indexes of the interfaces that carry a
// default route (IPv4 or IPv6, multipath included).
func defaultRouteLinks(nl *netlink.Handle) (map[int]bool, error) {
	out := map[int]bool{}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := nl.RouteList(nil, fam)
		if err != nil {
			return nil, fmt.Errorf("listing routes: %w", err)
		}
		for _, rt := range routes {
			if rt.Dst != nil {
				if ones, _ := rt.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			if rt.LinkIndex > 0 {
				out[rt.LinkIndex] = true
			}
			for _, nh := range rt.MultiPath {
				if nh.LinkIndex > 0 {
					out[nh.LinkIndex] = true
				}
			}
		}
	}
	return out, nil
}
