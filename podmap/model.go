package podmap

import (
	"net/netip"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/clovisor/clovisor/spans"
)

// Snapshot is what the informers hold at one moment.
type Snapshot struct {
	// Pods are the pods bound to this node.
	Pods []*corev1.Pod
	// Services and EndpointSlices are the cluster's.
	Services []*corev1.Service
	Slices   []*discoveryv1.EndpointSlice
}

// PortInfo is a server port of a pod.
type PortInfo struct {
	Port uint16
	// Protocol is the protocol named by a Service port (or the container
	// port's own name, or an override); "" when nothing names one.
	Protocol string
	// Source says where the protocol came from: "service/<name>",
	// "endpointslice/<name>", "container", "override" or "".
	Source string
}

// ContainerInfo is one container of a pod, as its status reports it.
type ContainerInfo struct {
	Name string
	// ID is the bare container ID, Runtime the part before "://".
	ID, Runtime string
	K8s         *spans.K8s
}

// PodInfo is what the agent knows of one pod of its node.
type PodInfo struct {
	UID, Name, Namespace string
	Labels               map[string]string
	// Running is phase Running; Selected says clovisor_labels selects it.
	Running, Selected bool
	IPs               []netip.Addr
	Containers        []ContainerInfo
	Ports             []PortInfo
	// K8s is the pod-level identity (no container): what its veth carries.
	K8s *spans.K8s
}

// Key is "<namespace>/<name>".
func (p *PodInfo) Key() string { return p.Namespace + "/" + p.Name }

// State is what the agent should trace, derived from a Snapshot and the
// live configuration.
type State struct {
	Node string
	// Pods are the pods of the node, by UID.
	Pods map[string]*PodInfo
	// Ports maps every server port of a selected pod to its protocol for
	// the kernel tables ("tcp" when unknown); overrides apply.
	Ports map[uint16]string
	// Hints maps the pod IP:port and Service cluster IP:port of selected
	// pods' servers to their protocol, where one is named.
	Hints map[netip.AddrPort]string
	// Peers names the cluster's pods and Services by address.
	Peers map[netip.Addr]*spans.K8sPeer
}

// Build derives the State. prev, when not nil, lends its *spans.K8s values
// where they did not change, so that span resources stay shared.
func Build(node string, snap Snapshot, cfg *LiveConfig, prev *State) *State {
	if cfg == nil {
		cfg = DefaultLiveConfig()
	}
	st := &State{
		Node:  node,
		Pods:  map[string]*PodInfo{},
		Ports: map[uint16]string{},
		Hints: map[netip.AddrPort]string{},
		Peers: map[netip.Addr]*spans.K8sPeer{},
	}
	svcByNS := map[string][]*corev1.Service{}
	for _, s := range snap.Services {
		svcByNS[s.Namespace] = append(svcByNS[s.Namespace], s)
	}
	sort.Slice(snap.Pods, func(i, j int) bool {
		a, b := snap.Pods[i], snap.Pods[j]
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	// Pods by IP, for selector-less Services' EndpointSlices.
	localByIP := map[netip.Addr]*PodInfo{}
	for _, pod := range snap.Pods {
		if pod.Spec.NodeName != node || pod.DeletionTimestamp != nil && pod.Status.Phase != corev1.PodRunning {
			continue
		}
		pi := podInfo(node, pod, cfg)
		if pp := prevPod(prev, pi.UID); pp != nil {
			reuseK8s(pi, pp)
		}
		st.Pods[pi.UID] = pi
		for _, ip := range pi.IPs {
			localByIP[ip] = pi
		}
		// Service ports selecting the pod.
		for _, svc := range svcByNS[pod.Namespace] {
			if len(svc.Spec.Selector) == 0 || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(pod.Labels)) {
				continue
			}
			for _, sp := range svc.Spec.Ports {
				if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
					continue
				}
				port, ok := targetPort(pod, sp.TargetPort, sp.Port)
				if !ok {
					continue
				}
				pi.addPort(port, PortProtocol(sp.Name, sp.AppProtocol), "service/"+svc.Name)
			}
		}
	}
	// Selector-less Services: their EndpointSlices name local pod IPs.
	svcs := map[string]*corev1.Service{}
	for _, s := range snap.Services {
		svcs[s.Namespace+"/"+s.Name] = s
	}
	for _, sl := range snap.Slices {
		svcName := sl.Labels[discoveryv1.LabelServiceName]
		svc := svcs[sl.Namespace+"/"+svcName]
		for _, ep := range sl.Endpoints {
			for _, a := range ep.Addresses {
				ip, err := netip.ParseAddr(a)
				if err != nil {
					continue
				}
				if ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" {
					if _, seen := st.Peers[ip]; !seen {
						st.Peers[ip] = &spans.K8sPeer{Namespace: sl.Namespace, PodName: ep.TargetRef.Name, ServiceName: svcName}
					}
				}
				pi := localByIP[ip]
				if pi == nil || svc == nil || len(svc.Spec.Selector) != 0 || pi.Namespace != sl.Namespace {
					continue
				}
				for _, sp := range sl.Ports {
					if sp.Port == nil || (sp.Protocol != nil && *sp.Protocol != corev1.ProtocolTCP) {
						continue
					}
					name := ""
					if sp.Name != nil {
						name = *sp.Name
					}
					pi.addPort(uint16(*sp.Port), PortProtocol(name, sp.AppProtocol), "endpointslice/"+sl.Name)
				}
			}
		}
	}
	// Container ports, named ports' own names, overrides; the tables.
	for _, pi := range st.Pods {
		pod := findPod(snap.Pods, pi.UID)
		for _, c := range pod.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Protocol != "" && cp.Protocol != corev1.ProtocolTCP {
					continue
				}
				pi.addPort(uint16(cp.ContainerPort), PortProtocol(cp.Name, nil), "container")
			}
		}
		for i := range pi.Ports {
			if p, ok := cfg.Protocols[pi.Ports[i].Port]; ok {
				pi.Ports[i].Protocol, pi.Ports[i].Source = p, "override"
			}
		}
		sort.Slice(pi.Ports, func(i, j int) bool { return pi.Ports[i].Port < pi.Ports[j].Port })
		if !pi.Selected {
			continue
		}
		for _, p := range pi.Ports {
			proto := p.Protocol
			if proto == "udp" {
				continue
			}
			if proto == "" {
				proto = ProtoTCP
			}
			if cur, ok := st.Ports[p.Port]; !ok || cur == ProtoTCP && proto != ProtoTCP || cur != ProtoTCP && proto != ProtoTCP && proto < cur {
				st.Ports[p.Port] = proto
			}
			if p.Protocol != "" {
				for _, ip := range pi.IPs {
					st.Hints[netip.AddrPortFrom(ip, p.Port)] = p.Protocol
				}
			}
		}
	}
	for port, proto := range cfg.Protocols {
		if _, ok := st.Ports[port]; ok {
			st.Ports[port] = proto
		}
	}
	// Services: cluster IPs as peers, and their ports as hints when they
	// lead to a selected pod's named port.
	for _, svc := range snap.Services {
		var ips []netip.Addr
		for _, s := range append([]string{svc.Spec.ClusterIP}, svc.Spec.ClusterIPs...) {
			if ip, err := netip.ParseAddr(s); err == nil {
				ips = append(ips, ip)
			}
		}
		for _, ip := range ips {
			st.Peers[ip] = &spans.K8sPeer{Namespace: svc.Namespace, ServiceName: svc.Name}
			for _, sp := range svc.Spec.Ports {
				if sp.Protocol != "" && sp.Protocol != corev1.ProtocolTCP {
					continue
				}
				proto := PortProtocol(sp.Name, sp.AppProtocol)
				if o, ok := cfg.Protocols[uint16(sp.Port)]; ok {
					proto = o
				}
				if proto != "" && proto != "udp" {
					st.Hints[netip.AddrPortFrom(ip, uint16(sp.Port))] = proto
				}
			}
		}
	}
	// Local pods as peers (also unselected ones), with a Service of theirs.
	for _, pi := range st.Pods {
		svc := ""
		for _, p := range pi.Ports {
			if s, ok := strings.CutPrefix(p.Source, "service/"); ok {
				svc = s
				break
			}
		}
		for _, ip := range pi.IPs {
			st.Peers[ip] = &spans.K8sPeer{Namespace: pi.Namespace, PodName: pi.Name, ServiceName: svc}
		}
	}
	return st
}

func prevPod(prev *State, uid string) *PodInfo {
	if prev == nil {
		return nil
	}
	return prev.Pods[uid]
}

// reuseK8s keeps the previous identities where they are equal.
func reuseK8s(pi, prev *PodInfo) {
	if prev.K8s != nil && *prev.K8s == *pi.K8s {
		pi.K8s = prev.K8s
	}
	for i := range pi.Containers {
		for _, pc := range prev.Containers {
			if pc.ID == pi.Containers[i].ID && pc.K8s != nil && *pc.K8s == *pi.Containers[i].K8s {
				pi.Containers[i].K8s = pc.K8s
			}
		}
	}
}

func findPod(pods []*corev1.Pod, uid string) *corev1.Pod {
	for _, p := range pods {
		if string(p.UID) == uid {
			return p
		}
	}
	return nil
}

// addPort records a server port; a named protocol beats none, the first
// named one stays.
func (p *PodInfo) addPort(port uint16, proto, source string) {
	if port == 0 {
		return
	}
	for i := range p.Ports {
		if p.Ports[i].Port == port {
			if p.Ports[i].Protocol == "" && proto != "" {
				p.Ports[i].Protocol, p.Ports[i].Source = proto, source
			}
			return
		}
	}
	p.Ports = append(p.Ports, PortInfo{Port: port, Protocol: proto, Source: source})
}

// targetPort resolves a Service port's targetPort on a pod: a number, a
// container port's name, or (unset) the Service port itself.
func targetPort(pod *corev1.Pod, tp intstr.IntOrString, svcPort int32) (uint16, bool) {
	switch {
	case tp.Type == intstr.Int && tp.IntVal == 0, tp.Type == intstr.String && tp.StrVal == "":
		return uint16(svcPort), svcPort > 0
	case tp.Type == intstr.Int:
		return uint16(tp.IntVal), tp.IntVal > 0 && tp.IntVal < 65536
	}
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == tp.StrVal && (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) {
				return uint16(cp.ContainerPort), true
			}
		}
	}
	return 0, false
}

// podInfo extracts what the agent needs of a pod.
func podInfo(node string, pod *corev1.Pod, cfg *LiveConfig) *PodInfo {
	pi := &PodInfo{
		UID:       string(pod.UID),
		Name:      pod.Name,
		Namespace: pod.Namespace,
		Labels:    pod.Labels,
		Running:   pod.Status.Phase == corev1.PodRunning,
		Selected:  cfg.Labels.Matches(pod.Namespace, pod.Labels),
	}
	seen := map[netip.Addr]bool{}
	for _, s := range append([]string{pod.Status.PodIP}, podIPs(pod)...) {
		if ip, err := netip.ParseAddr(s); err == nil && !seen[ip] {
			seen[ip] = true
			pi.IPs = append(pi.IPs, ip)
		}
	}
	base := spans.K8s{Node: node, Namespace: pod.Namespace, PodName: pod.Name, PodUID: string(pod.UID)}
	workloadOf(pod, &base)
	base.ServiceName = serviceName(pod, &base)
	k := base
	pi.K8s = &k
	for _, cs := range append(append([]corev1.ContainerStatus(nil), pod.Status.InitContainerStatuses...), pod.Status.ContainerStatuses...) {
		if cs.ContainerID == "" {
			continue
		}
		rt, id := SplitContainerID(cs.ContainerID)
		ck := base
		ck.ContainerName, ck.ContainerID = cs.Name, id
		pi.Containers = append(pi.Containers, ContainerInfo{Name: cs.Name, ID: id, Runtime: rt, K8s: &ck})
	}
	return pi
}

func podIPs(pod *corev1.Pod) []string {
	out := make([]string, 0, len(pod.Status.PodIPs))
	for _, ip := range pod.Status.PodIPs {
		out = append(out, ip.IP)
	}
	return out
}

// workloadOf fills the owning workload from the pod's controller owner
// reference: a ReplicaSet's Deployment is the ReplicaSet's name less
// "-<pod-template-hash>" (how the Deployment controller names them).
func workloadOf(pod *corev1.Pod, k *spans.K8s) {
	for _, o := range pod.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		switch o.Kind {
		case "ReplicaSet":
			k.ReplicaSet = o.Name
			if h := pod.Labels["pod-template-hash"]; h != "" {
				if d, ok := strings.CutSuffix(o.Name, "-"+h); ok && d != "" {
					k.Deployment = d
				}
			}
		case "StatefulSet":
			k.StatefulSet = o.Name
		case "DaemonSet":
			k.DaemonSet = o.Name
		case "Job":
			k.Job = o.Name
		}
	}
}

// serviceName picks service.name: the OpenTelemetry annotation, the
// app.kubernetes.io/name or app label, the workload, the pod's name.
func serviceName(pod *corev1.Pod, k *spans.K8s) string {
	for _, v := range []string{
		pod.Annotations["resource.opentelemetry.io/service.name"],
		pod.Labels["app.kubernetes.io/name"],
		pod.Labels["app"],
		k.Deployment, k.StatefulSet, k.DaemonSet, k.Job, k.ReplicaSet,
	} {
		if v != "" {
			return v
		}
	}
	return pod.Name
}
