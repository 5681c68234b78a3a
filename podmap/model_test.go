package podmap

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/clovisor/clovisor/spans"
)

func ptr[T any](v T) *T { return &v }

func TestPortProtocol(t *testing.T) {
	for _, c := range []struct {
		name string
		app  *string
		want string
	}{
		{"http", nil, "http"},
		{"http-web", nil, "http"},
		{"HTTP-Web", nil, "http"},
		{"http2", nil, "http2"},
		{"http2-x", nil, "http2"},
		{"https-admin", nil, "https"},
		{"grpc", nil, "grpc"},
		{"grpc-web", nil, "grpc-web"},
		{"grpc-web-api", nil, "grpc-web"},
		{"grpc-api", nil, "grpc"},
		{"tcp-db", nil, "tcp"},
		{"redis", nil, "redis"},
		{"mongo-primary", nil, "mongo"},
		{"mysql", nil, "mysql"},
		{"udp-dns", nil, "udp"},
		{"web", nil, ""},
		{"httpx", nil, ""},
		{"", nil, ""},
		{"web", ptr("http"), "http"},
		{"tcp-x", ptr("kubernetes.io/h2c"), "http2"},
		{"x", ptr("kubernetes.io/ws"), "http"},
		{"x", ptr("kubernetes.io/wss"), "https"},
		{"http-x", ptr("example.com/custom"), "http"},
	} {
		if got := PortProtocol(c.name, c.app); got != c.want {
			t.Errorf("PortProtocol(%q, %v) = %q, want %q", c.name, c.app, got, c.want)
		}
	}
}

func TestParseSelection(t *testing.T) {
	s, err := ParseSelection("default, shop:app=web\n*:app.kubernetes.io/name=cart # comment")
	if err != nil {
		t.Fatal(err)
	}
	want := Selection{{Namespace: "default"}, {Namespace: "shop", Key: "app", Value: "web"}, {Namespace: "*", Key: "app.kubernetes.io/name", Value: "cart"}}
	if !reflect.DeepEqual(s, want) {
		t.Fatalf("got %+v, want %+v", s, want)
	}
	for _, c := range []struct {
		ns     string
		labels map[string]string
		want   bool
	}{
		{"default", nil, true},
		{"shop", map[string]string{"app": "web"}, true},
		{"shop", map[string]string{"app": "db"}, false},
		{"other", map[string]string{"app.kubernetes.io/name": "cart"}, true},
		{"other", map[string]string{"app": "web"}, false},
	} {
		if got := s.Matches(c.ns, c.labels); got != c.want {
			t.Errorf("Matches(%s, %v) = %v", c.ns, c.labels, got)
		}
	}
	if !(Selection{{Namespace: "*"}}).Matches("anything", nil) {
		t.Error("* does not match every namespace")
	}
	for _, bad := range []string{"", "Shop", "shop:app", "shop:=x", "shop:app=a b", "bad_ns", "shop:app=" + strings.Repeat("x", 64)} {
		if _, err := ParseSelection(bad); err == nil {
			t.Errorf("ParseSelection(%q): no error", bad)
		}
	}
}

func TestParseEgressMatch(t *testing.T) {
	r, err := ParseEgressMatch("203.0.113.0/24:80, 198.51.100.7:443:frontend\n[fd00:c10::/64]:8080:web-,10.0.0.1:*")
	if err != nil {
		t.Fatal(err)
	}
	want := []EgressRule{
		{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Port: 80},
		{Prefix: netip.MustParsePrefix("198.51.100.7/32"), Port: 443, PodPrefix: "frontend"},
		{Prefix: netip.MustParsePrefix("fd00:c10::/64"), Port: 8080, PodPrefix: "web-"},
		{Prefix: netip.MustParsePrefix("10.0.0.1/32"), Port: 0},
	}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("got %+v\nwant %+v", r, want)
	}
	for _, bad := range []string{"203.0.113.0/24", "300.1.1.1:80", "10.0.0.1:99999", "10.0.0.1:http", "[fd00::1:80", "10.0.0.1:80:Bad_Pod", "10.0.0.0/33:80"} {
		if _, err := ParseEgressMatch(bad); err == nil {
			t.Errorf("ParseEgressMatch(%q): no error", bad)
		}
	}
}

func TestParseConfigMap(t *testing.T) {
	known := []string{"tcp", "http", "redis"}
	c, err := ParseConfigMap(map[string]string{
		KeyLabels:            "shop:app=web",
		KeyEgressMatch:       "203.0.113.0/24:80",
		KeyJaegerServer:      "http://collector:4318",
		KeyPayloadBytes:      "512",
		KeyProtocolOverrides: "8080=http, 6379=redis",
	}, 8192, known)
	if err != nil {
		t.Fatal(err)
	}
	if c.Labels.String() != "shop:app=web" || len(c.Egress) != 1 || c.Endpoint != "http://collector:4318" || c.PayloadBytes != 512 ||
		!reflect.DeepEqual(c.Protocols, map[uint16]string{8080: "http", 6379: "redis"}) {
		t.Errorf("parsed %+v", c)
	}
	d, err := ParseConfigMap(nil, 8192, known)
	if err != nil || d.Labels.String() != "default" {
		t.Errorf("empty ConfigMap: %+v, %v", d, err)
	}
	for _, bad := range []map[string]string{
		{KeyLabels: "Not A Namespace"},
		{KeyEgressMatch: "nonsense"},
		{KeyExporterEndpoint: "collector"},
		{KeyPayloadBytes: "100000"},
		{KeyProtocolOverrides: "8080=gopher"},
		{"clovisor_lables": "default"},
	} {
		_, err := ParseConfigMap(bad, 8192, known)
		if err == nil {
			t.Errorf("%v: no error", bad)
			continue
		}
		for k := range bad {
			if !strings.Contains(err.Error(), k) {
				t.Errorf("%v: error %q does not name the key", bad, err)
			}
		}
	}
}

func TestParseCgroupDirs(t *testing.T) {
	const uid = "0b7c5e7a-2d3f-4a6b-9c1d-2e3f4a5b6c7d"
	const cid = "3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e"
	for _, c := range []struct {
		name, uid, qos string
		ok             bool
	}{
		{"pod" + uid, uid, "", true},
		{"kubepods-burstable-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice", uid, "burstable", true},
		{"kubepods-besteffort-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice", uid, "besteffort", true},
		{"kubepods-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice", uid, "guaranteed", true},
		{"kubepods-burstable.slice", "", "", false},
		{"podnot-a-uid", "", "", false},
		{"system.slice", "", "", false},
	} {
		uid, qos, ok := parsePodDir(c.name)
		if uid != c.uid || qos != c.qos || ok != c.ok {
			t.Errorf("parsePodDir(%q) = %q %q %v", c.name, uid, qos, ok)
		}
	}
	for _, c := range []struct {
		name, id, runtime string
		ok                bool
	}{
		{cid, cid, "", true},
		{"cri-containerd-" + cid + ".scope", cid, "containerd", true},
		{"crio-" + cid + ".scope", cid, "cri-o", true},
		{"crio-" + cid, cid, "cri-o", true},
		{"docker-" + cid + ".scope", cid, "docker", true},
		{"crio-conmon-" + cid + ".scope", "", "", false},
		{cid + ".scope", "", "", false},
		{"abc", "", "", false},
	} {
		id, rt, ok := parseContainerDir(c.name)
		if id != c.id || rt != c.runtime || ok != c.ok {
			t.Errorf("parseContainerDir(%q) = %q %q %v", c.name, id, rt, ok)
		}
	}
}

// TestBuild: ports and protocols from Services (targetPort by number and by
// name, appProtocol), selector-less Services' EndpointSlices, container
// port names, overrides; selection; identities and peers.
func TestBuild(t *testing.T) {
	ctrl := ptr(true)
	web := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-7d4b9c8f6d-x2x9z", Namespace: "shop", UID: types.UID("u-web"),
			Labels:          map[string]string{"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6d", "tier": "front"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web-7d4b9c8f6d", Controller: ctrl}}},
		Spec: corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "nginx", Ports: []corev1.ContainerPort{
			{Name: "web", ContainerPort: 8080}, {Name: "metrics", ContainerPort: 9090}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.0.5", PodIPs: []corev1.PodIP{{IP: "10.1.0.5"}, {IP: "fd00::5"}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "nginx", ContainerID: "containerd://abc"}}},
	}
	db := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "db-0", Namespace: "shop", UID: types.UID("u-db"), Labels: map[string]string{"app": "db"},
			OwnerReferences: []metav1.OwnerReference{{Kind: "StatefulSet", Name: "db", Controller: ctrl}}},
		Spec:   corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "redis"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.0.6", ContainerStatuses: []corev1.ContainerStatus{{Name: "redis", ContainerID: "cri-o://def"}}},
	}
	other := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "x", Namespace: "kube-system", UID: types.UID("u-x")},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "x", Ports: []corev1.ContainerPort{{ContainerPort: 7000, Name: "http"}}}}},
		Status:     corev1.PodStatus{Phase: corev1.PodPending},
	}
	elsewhere := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "far", Namespace: "shop", UID: "u-far"}, Spec: corev1.PodSpec{NodeName: "n2"}}
	svcWeb := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app.kubernetes.io/name": "web"}, ClusterIP: "10.96.0.10",
			Ports: []corev1.ServicePort{{Name: "http-web", Port: 80, TargetPort: intstr.FromString("web")},
				{Name: "prom", Port: 9090, TargetPort: intstr.FromInt32(9090), AppProtocol: ptr("http")}}}}
	svcDB := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: "shop"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.11", Ports: []corev1.ServicePort{{Name: "redis", Port: 6379}}}}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "db-abc", Namespace: "shop", Labels: map[string]string{discoveryv1.LabelServiceName: "db"}},
		Endpoints:  []discoveryv1.Endpoint{{Addresses: []string{"10.1.0.6"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "db-0"}}},
		Ports:      []discoveryv1.EndpointPort{{Name: ptr("redis"), Port: ptr(int32(6379))}},
	}
	remote := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "web-far", Namespace: "shop", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		Endpoints:  []discoveryv1.Endpoint{{Addresses: []string{"10.2.0.9"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "far"}}},
	}
	snap := Snapshot{Pods: []*corev1.Pod{web, db, other, elsewhere}, Services: []*corev1.Service{svcWeb, svcDB}, Slices: []*discoveryv1.EndpointSlice{slice, remote}}
	cfg := &LiveConfig{Labels: Selection{{Namespace: "shop"}}, Protocols: map[uint16]string{9090: "tcp"}}
	st := Build("n1", snap, cfg, nil)

	if len(st.Pods) != 3 {
		t.Fatalf("%d pods, want the 3 of node n1", len(st.Pods))
	}
	w := st.Pods["u-web"]
	wantPorts := []PortInfo{{Port: 8080, Protocol: "http", Source: "service/web"}, {Port: 9090, Protocol: "tcp", Source: "override"}}
	if !w.Selected || !w.Running || !reflect.DeepEqual(w.Ports, wantPorts) {
		t.Errorf("web: selected %v running %v ports %+v, want %+v", w.Selected, w.Running, w.Ports, wantPorts)
	}
	if got := st.Pods["u-db"].Ports; !reflect.DeepEqual(got, []PortInfo{{Port: 6379, Protocol: "redis", Source: "endpointslice/db-abc"}}) {
		t.Errorf("db ports %+v", got)
	}
	if x := st.Pods["u-x"]; x.Selected || x.Running {
		t.Errorf("kube-system pod: selected %v running %v", x.Selected, x.Running)
	}
	if want := map[uint16]string{8080: "http", 9090: "tcp", 6379: "redis"}; !reflect.DeepEqual(st.Ports, want) {
		t.Errorf("ports %v, want %v (the unselected pod's 7000 not among them)", st.Ports, want)
	}
	wantHints := map[netip.AddrPort]string{
		netip.MustParseAddrPort("10.1.0.5:8080"): "http", netip.MustParseAddrPort("[fd00::5]:8080"): "http",
		netip.MustParseAddrPort("10.1.0.5:9090"): "tcp", netip.MustParseAddrPort("[fd00::5]:9090"): "tcp",
		netip.MustParseAddrPort("10.1.0.6:6379"): "redis",
		netip.MustParseAddrPort("10.96.0.10:80"): "http", netip.MustParseAddrPort("10.96.0.10:9090"): "tcp",
		netip.MustParseAddrPort("10.96.0.11:6379"): "redis",
	}
	if !reflect.DeepEqual(st.Hints, wantHints) {
		t.Errorf("hints %v\nwant %v", st.Hints, wantHints)
	}
	wantK := spans.K8s{Node: "n1", Namespace: "shop", PodName: "web-7d4b9c8f6d-x2x9z", PodUID: "u-web", ContainerName: "nginx", ContainerID: "abc",
		Deployment: "web", ReplicaSet: "web-7d4b9c8f6d", ServiceName: "web"}
	if len(w.Containers) != 1 || *w.Containers[0].K8s != wantK || w.Containers[0].Runtime != "containerd" {
		t.Errorf("web container %+v, want %+v", w.Containers, wantK)
	}
	if k := st.Pods["u-db"].K8s; k.StatefulSet != "db" || k.ServiceName != "db" || k.ContainerID != "" {
		t.Errorf("db identity %+v", k)
	}
	for ip, want := range map[string]spans.K8sPeer{
		"10.96.0.10": {Namespace: "shop", ServiceName: "web"},
		"10.1.0.5":   {Namespace: "shop", PodName: "web-7d4b9c8f6d-x2x9z", ServiceName: "web"},
		"10.2.0.9":   {Namespace: "shop", PodName: "far", ServiceName: "web"},
		"10.1.0.6":   {Namespace: "shop", PodName: "db-0"},
	} {
		if p := st.Peers[netip.MustParseAddr(ip)]; p == nil || *p != want {
			t.Errorf("peer %s = %+v, want %+v", ip, p, want)
		}
	}
	// Unchanged identities are the same pointers in the next State.
	st2 := Build("n1", snap, cfg, st)
	if st2.Pods["u-web"].Containers[0].K8s != w.Containers[0].K8s || st2.Pods["u-web"].K8s != w.K8s {
		t.Error("identities not reused from the previous State")
	}
	// Default selection: the "default" namespace only.
	if st3 := Build("n1", snap, nil, nil); st3.Pods["u-web"].Selected || len(st3.Ports) != 0 {
		t.Errorf("default selection selects shop's pods: ports %v", st3.Ports)
	}
}
