package spans

import (
	"net/netip"

	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// K8s is the Kubernetes identity of a traced workload (a container of a
// pod, or a pod as a whole for what its veth carries). It becomes resource
// attributes: k8s.* per the semantic conventions, service.name and
// service.namespace. Values are never changed once handed out, so that an
// Enricher may return the same *K8s for every span of a container and the
// Exporter may key its resources by the pointer.
type K8s struct {
	Node, Namespace, PodName, PodUID string
	// ContainerName and ContainerID are empty for pod-level identities.
	ContainerName, ContainerID string
	// The owning workload, through owner references (a ReplicaSet's
	// Deployment by the pod-template-hash label).
	Deployment, ReplicaSet, StatefulSet, DaemonSet, Job string
	// ServiceName is service.name: app.kubernetes.io/name, app, the
	// workload or the pod name.
	ServiceName string
}

// K8sPeer names the other end of a connection when it is in the cluster.
type K8sPeer struct {
	Namespace string
	// PodName is set when the address is a pod's, ServiceName when it is
	// a Service's cluster IP or the pod is one of its endpoints.
	PodName, ServiceName string
}

// Enricher maps sessions to Kubernetes identities (podmap implements it).
// It is called under the Exporter's lock for every span: it must be cheap
// and must not call the Exporter.
type Enricher interface {
	// Workload returns the identity of the traced end of s: for socket
	// sessions the container of s.CgroupID, for wire sessions the pod of
	// the veth s.Wire.Interface, or on a node NIC the local pod whose
	// address is s.Client's or s.Server's. nil when unknown.
	Workload(s *Session) *K8s
	// Peer names the cluster pod or Service at addr, nil when unknown.
	Peer(addr netip.Addr) *K8sPeer
}

// Attributes of the peer of a span's connection when Kubernetes knows it
// (there are no semantic conventions for a peer's Kubernetes identity).
const (
	AttrPeerPod       = attribute.Key("clovisor.peer.k8s.pod.name")
	AttrPeerNamespace = attribute.Key("clovisor.peer.k8s.namespace.name")
	AttrPeerService   = attribute.Key("clovisor.peer.k8s.service.name")
)

// k8sResourceAttrs appends the resource attributes of k (other than
// service.name, which newResource sets).
func k8sResourceAttrs(a []attribute.KeyValue, k *K8s) []attribute.KeyValue {
	add := func(key attribute.Key, v string) {
		if v != "" {
			a = append(a, key.String(v))
		}
	}
	add(semconv.K8SNodeNameKey, k.Node)
	add(semconv.K8SNamespaceNameKey, k.Namespace)
	add(semconv.ServiceNamespaceKey, k.Namespace)
	add(semconv.K8SPodNameKey, k.PodName)
	add(semconv.K8SPodUIDKey, k.PodUID)
	add(semconv.K8SContainerNameKey, k.ContainerName)
	add(semconv.K8SDeploymentNameKey, k.Deployment)
	add(semconv.K8SReplicaSetNameKey, k.ReplicaSet)
	add(semconv.K8SStatefulSetNameKey, k.StatefulSet)
	add(semconv.K8SDaemonSetNameKey, k.DaemonSet)
	add(semconv.K8SJobNameKey, k.Job)
	return a
}

// peerOf returns the address of the other end of s as the traced end sees
// it: the server for CLIENT spans, the client for SERVER spans; for wire
// sessions the end that is not the workload's.
func peerOf(s *Session, k *K8s, e Enricher) netip.Addr {
	switch s.Kind {
	case Server:
		return s.Client.Addr().Unmap()
	case Client:
		return s.Server.Addr().Unmap()
	}
	// Wire: the workload is the pod of the veth or NIC address; its
	// peer is the other end.
	c, sv := s.Client.Addr().Unmap(), s.Server.Addr().Unmap()
	if k != nil {
		if p := e.Peer(c); p != nil && p.PodName == k.PodName && p.Namespace == k.Namespace {
			return sv
		}
	}
	return c
}

// appendPeer adds the peer's Kubernetes identity, if known.
func appendPeer(a []attribute.KeyValue, p *K8sPeer) []attribute.KeyValue {
	if p == nil {
		return a
	}
	if p.PodName != "" {
		a = append(a, AttrPeerPod.String(p.PodName))
	}
	if p.ServiceName != "" {
		a = append(a, AttrPeerService.String(p.ServiceName))
	}
	if p.Namespace != "" {
		a = append(a, AttrPeerNamespace.String(p.Namespace))
	}
	return a
}

// enrichment returns the service (resource key) of s and its peer's
// identity, through the Enricher when there is one.
func (e *Exporter) enrichment(s *Session) (service, *K8sPeer) {
	if e.enrich == nil {
		return serviceOf(s), nil
	}
	k := e.enrich.Workload(s)
	peer := e.enrich.Peer(peerOf(s, k, e.enrich))
	if k == nil {
		return serviceOf(s), peer
	}
	sv := service{name: k.ServiceName, containerID: k.ContainerID, k8s: k}
	if sv.name == "" {
		sv.name = serviceOf(s).name
	}
	return sv, peer
}

// appendPeer adds the peer attributes to a span's attributes, applying the
// attribute count limit as build does.
func (e *Exporter) appendPeer(a []attribute.KeyValue, dropped int, p *K8sPeer) ([]attribute.KeyValue, int) {
	a = appendPeer(a, p)
	if e.attrs.countLimit >= 0 && len(a) > e.attrs.countLimit {
		var more int
		a, more = e.attrs.normalize(a)
		dropped += more
	}
	return a, dropped
}
