package spans

import (
	"net/netip"
	"strings"
	"testing"
)

// fakeEnricher knows cgroup 4242 as a container of pod "client", the veth
// "vethweb" as pod "web", and the addresses of both pods and a Service.
type fakeEnricher struct{ client, web *K8s }

func (f *fakeEnricher) Workload(s *Session) *K8s {
	switch {
	case s.Wire == nil && s.CgroupID == 4242:
		return f.client
	case s.Wire != nil && s.Wire.Interface == "vethweb":
		return f.web
	}
	return nil
}

func (f *fakeEnricher) Peer(a netip.Addr) *K8sPeer {
	switch a.String() {
	case "10.201.0.1":
		return &K8sPeer{Namespace: "shop", PodName: "client"}
	case "10.201.0.2":
		return &K8sPeer{Namespace: "shop", PodName: "web-0", ServiceName: "web"}
	}
	return nil
}

// TestEnricher: spans of known workloads get the Kubernetes resource
// attributes and service.name, and the peer's identity; others keep the
// process-derived resource.
func TestEnricher(t *testing.T) {
	f := &fakeEnricher{
		client: &K8s{Node: "n1", Namespace: "shop", PodName: "client", PodUID: "u1", ContainerName: "curl", ContainerID: "abc",
			ServiceName: "client"},
		web: &K8s{Node: "n1", Namespace: "shop", PodName: "web-0", PodUID: "u2", StatefulSet: "web", ServiceName: "web"},
	}
	e, mem := memExporter(t, Config{Enricher: f})
	e.Export(clientSession())
	e.Export(serverSession()) // cgroup 5151: unknown
	w := serverSession()
	w.Point, w.Kind, w.Process, w.CgroupID, w.CgroupPath = PointPodVeth, 0, Process{}, 0, ""
	w.Wire = &Wire{Interface: "vethweb"}
	e.Export(w)
	spans := collect(t, e, mem)
	if len(spans) != 3 {
		t.Fatalf("%d spans", len(spans))
	}
	equalMaps(t, "client resource", withoutBase(attrMap(spans[0].Resource.Attributes())), map[string]any{
		"service.name": "client", "service.namespace": "shop", "k8s.node.name": "n1", "k8s.namespace.name": "shop",
		"k8s.pod.name": "client", "k8s.pod.uid": "u1", "k8s.container.name": "curl", "container.id": "abc",
	})
	ca := attrMap(spans[0].Attributes)
	if ca["clovisor.peer.k8s.pod.name"] != "web-0" || ca["clovisor.peer.k8s.service.name"] != "web" || ca["clovisor.peer.k8s.namespace.name"] != "shop" {
		t.Errorf("client span peer attributes: %v", ca)
	}
	sr := attrMap(spans[1].Resource.Attributes())
	if sr["service.name"] != "nginx" || sr["k8s.pod.name"] != nil {
		t.Errorf("unknown workload's resource %v: want the process's", sr)
	}
	if sa := attrMap(spans[1].Attributes); sa["clovisor.peer.k8s.pod.name"] != "client" {
		t.Errorf("server span of an unknown workload: peer %v", sa["clovisor.peer.k8s.pod.name"])
	}
	wr := attrMap(spans[2].Resource.Attributes())
	if wr["k8s.pod.name"] != "web-0" || wr["k8s.statefulset.name"] != "web" || wr["service.name"] != "web" || wr["container.id"] != nil {
		t.Errorf("wire span resource %v", wr)
	}
	// The wire span's workload is the server (web-0): its peer is the client.
	if wa := attrMap(spans[2].Attributes); wa["clovisor.peer.k8s.pod.name"] != "client" {
		t.Errorf("wire span peer %v, want client", wa["clovisor.peer.k8s.pod.name"])
	}
	e.Export(clientSession())
	if again := collect(t, e, mem); len(again) != 4 || again[3].Resource != spans[0].Resource {
		t.Error("the spans of one container do not share their resource")
	}
}

// withoutBase drops the attributes every resource has (host.*, telemetry.*).
func withoutBase(m map[string]any) map[string]any {
	for k := range m {
		if strings.HasPrefix(k, "host.") || strings.HasPrefix(k, "telemetry.") {
			delete(m, k)
		}
	}
	return m
}
