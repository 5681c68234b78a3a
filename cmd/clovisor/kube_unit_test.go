package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/clovisor/clovisor/podmap"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/spans"
	"github.com/clovisor/clovisor/tcsessions"
)

// fakeSockets records the traced cgroups.
type fakeSockets struct {
	mu  sync.Mutex
	ids map[uint64]bool
}

func (f *fakeSockets) AddCgroup(id uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ids[id] = true
	return nil
}

func (f *fakeSockets) RemoveCgroup(id uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.ids, id)
	return nil
}

func (f *fakeSockets) set() map[uint64]bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[uint64]bool{}
	for k := range f.ids {
		out[k] = true
	}
	return out
}

func testPod(ns, name, uid, cid string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid), Labels: map[string]string{"app": name}},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "c"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.9.0.1",
			ContainerStatuses: []corev1.ContainerStatus{{Name: "c", ContainerID: "containerd://" + cid}}},
	}
}

// TestReconcileLogic drives the reconciler with client-go's fake clientset
// and a kubepods tree of plain directories (pure logic: no kernel, no API
// server): the traced cgroups follow the selection, the index names them,
// an invalid ConfigMap is rejected with an Event and the last good
// configuration stays, a deleted pod's cgroup leaves.
func TestReconcileLogic(t *testing.T) {
	const (
		uidA = "11111111-2222-3333-4444-555555555555"
		uidB = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
	)
	cidA, cidB := strings.Repeat("a", 64), strings.Repeat("b", 64)
	mount := t.TempDir()
	inode := map[string]uint64{}
	for uid, cid := range map[string]string{uidA: cidA, uidB: cidB} {
		dir := filepath.Join(mount, "kubepods", "besteffort", "pod"+uid, cid)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(dir, &st); err != nil {
			t.Fatal(err)
		}
		inode[cid] = st.Ino
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "clovisor", Name: "clovisor"}, Data: map[string]string{"clovisor_labels": "shop"}}
	client := fake.NewClientset(cm, testPod("shop", "a", uidA, cidA), testPod("other", "b", uidB, cidB))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	w := podmap.NewWatcher(client, podmap.WatcherOptions{Node: "n1", Namespace: "clovisor", ConfigMap: "clovisor", Logger: log})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w.Start(ctx)
	if !w.WaitForSync(ctx) {
		t.Fatal("not synced")
	}
	h, err := podmap.NewHierarchy(mount)
	if err != nil {
		t.Fatal(err)
	}
	sock := &fakeSockets{ids: map[uint64]bool{}}
	cfg, err := readConfig(w.ConfigMap(), 8192)
	if err != nil {
		t.Fatal(err)
	}
	ka := newKubeAgent(log, w, h, "n1", sock, nil, nil, cfg, configMapVersion(w.ConfigMap()))
	ka.maxPaylod = 8192
	payload := &fakePayload{n: 4096}
	ka.onConfig = func(_, cur *podmap.LiveConfig) { livePayload(log, &options{set: map[string]bool{}}, cur, payload) }
	eventually := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			ka.reconcile(ctx)
			if cond() {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out: %s (traced %v)", what, sock.set())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	eventually("shop's pod traced alone", func() bool {
		s := sock.set()
		return len(s) == 1 && s[inode[cidA]]
	})
	k := ka.index.Workload(&spans.Session{CgroupID: inode[cidA]})
	if k == nil || k.PodName != "a" || k.Namespace != "shop" || k.ContainerName != "c" || k.ContainerID != cidA || k.Node != "n1" {
		t.Fatalf("index for pod a's cgroup: %+v", k)
	}
	if ka.index.Workload(&spans.Session{CgroupID: inode[cidB]}) != nil {
		t.Error("the unselected pod's cgroup is in the index")
	}

	// Invalid: rejected, Event, the old selection stays.
	cm.Data = map[string]string{"clovisor_labels": "Not Valid!"}
	cm.ResourceVersion = "2"
	if _, err := client.CoreV1().ConfigMaps("clovisor").Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("an InvalidConfiguration event", func() bool {
		evs, _ := client.CoreV1().Events("clovisor").List(ctx, metav1.ListOptions{})
		for _, e := range evs.Items {
			if e.Reason == "InvalidConfiguration" && e.Type == corev1.EventTypeWarning && e.InvolvedObject.Name == "clovisor" &&
				strings.Contains(e.Message, "clovisor_labels") {
				return true
			}
		}
		return false
	})
	if s := sock.set(); len(s) != 1 || !s[inode[cidA]] || ka.cfg.Labels.String() != "shop" {
		t.Errorf("after the invalid edit: traced %v, labels %s", s, ka.cfg.Labels)
	}

	if calls := payload.calls(); len(calls) != 0 {
		t.Errorf("payload prefix set to %v, before any clovisor_payload_bytes", calls)
	}

	// Valid: both namespaces, and a payload prefix applied at once.
	cm.Data = map[string]string{"clovisor_labels": "shop\nother:app=b", "clovisor_egress_match": "192.0.2.0/24:80",
		"clovisor_payload_bytes": "300"}
	cm.ResourceVersion = "3"
	if _, err := client.CoreV1().ConfigMaps("clovisor").Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("both pods traced", func() bool { return len(sock.set()) == 2 })
	if calls := payload.calls(); !slices.Equal(calls, []int{300}) {
		t.Errorf("SetPayloadBytes calls %v after clovisor_payload_bytes: 300, want [300]", calls)
	}
	if len(ka.cfg.Egress) != 1 || ka.cfg.Egress[0].Prefix != netip.MustParsePrefix("192.0.2.0/24") {
		t.Errorf("egress %+v", ka.cfg.Egress)
	}

	// Deleted: its cgroup leaves the filter and the index.
	if err := client.CoreV1().Pods("shop").Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually("pod a untraced", func() bool {
		s := sock.set()
		return len(s) == 1 && s[inode[cidB]]
	})
	if ka.index.Workload(&spans.Session{CgroupID: inode[cidA]}) != nil {
		t.Error("the deleted pod's cgroup is still in the index")
	}
}

// TestKeepWire: an egress rule limited to pods by name prefix hides other
// pods' exchanges with that server, unless another table traces them.
func TestKeepWire(t *testing.T) {
	ka := newKubeAgent(slog.New(slog.NewTextHandler(io.Discard, nil)), nil, nil, "n1", nil, nil, nil, podmap.DefaultLiveConfig(), "")
	ka.index.Set(&podmap.IndexData{ByInterface: map[string]*spans.K8s{
		"veth-web": {PodName: "web-1"}, "veth-cli": {PodName: "client"},
	}})
	ka.filter.Store(&wireFilter{
		rules: []podmap.EgressRule{{Prefix: netip.MustParsePrefix("203.0.113.0/24"), Port: 80, PodPrefix: "web"}},
		ports: map[uint16]bool{8080: true},
	})
	ex := func(iface, server string) *tcsessions.Exchange {
		return &tcsessions.Exchange{Interface: iface, Role: tcsessions.RolePod, Server: netip.MustParseAddrPort(server)}
	}
	for _, c := range []struct {
		ex   *tcsessions.Exchange
		want bool
	}{
		{ex("veth-web", "203.0.113.5:80"), true},
		{ex("veth-cli", "203.0.113.5:80"), false},
		{ex("veth-cli", "203.0.113.5:443"), true}, // no rule matches: not ours to hide
		{ex("veth-cli", "198.51.100.1:80"), true},
		{&tcsessions.Exchange{Interface: "nic0", Role: tcsessions.RoleNode, Server: netip.MustParseAddrPort("203.0.113.5:80")}, true},
	} {
		if got := ka.keepWire(c.ex); got != c.want {
			t.Errorf("%s -> %s: keep %v, want %v", c.ex.Interface, c.ex.Server, got, c.want)
		}
	}
}

// TestExportSwitchReconfigure: the exporter follows the ConfigMap's
// endpoint and protocol; a ConfigMap without them keeps the current one
// (never the values the ConfigMap had when the agent started, which
// kubeSetup.apply put in the options); flags win over the ConfigMap.
func TestExportSwitchReconfigure(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var made []string
	mk := func(endpoint, protocol string) (*spans.Exporter, error) {
		made = append(made, endpoint+" "+protocol)
		return spans.New(context.Background(), spans.Config{Output: spans.OutputJSON, Writer: io.Discard}, log)
	}
	cfg := func(endpoint, protocol string) *podmap.LiveConfig {
		c := podmap.DefaultLiveConfig()
		c.Endpoint, c.Protocol = endpoint, protocol
		return c
	}
	first, _ := mk("http://a:4318", "http/protobuf")
	made = nil
	// As after kubeSetup.apply with a ConfigMap naming A.
	o := &options{endpoint: "http://a:4318", protocol: "http/protobuf", set: map[string]bool{}}
	x := &exportSwitch{cur: first, endpoint: o.endpoint, protocol: o.protocol}
	steps := []struct {
		cfg  *podmap.LiveConfig
		want string // endpoint and protocol now, "" unchanged
	}{
		{cfg("http://a:4318", "http/protobuf"), ""},
		{cfg("http://b:4317", "grpc"), "http://b:4317 grpc"},
		{cfg("", ""), ""}, // keys removed: B stays
		{cfg("http://b:4317", ""), "http://b:4317 "}, // protocol key removed: the default
		{cfg("http://a:4318", "http/json"), "http://a:4318 http/json"},
	}
	old := cfg("http://a:4318", "http/protobuf")
	for i, s := range steps {
		made = nil
		x.reconfigure(log, o, old, s.cfg, mk)
		old = s.cfg
		got := strings.Join(made, ",")
		if got != s.want {
			t.Errorf("step %d: exporter made %q, want %q", i, got, s.want)
		}
	}
	// With --otlp-endpoint and --otlp-protocol, the ConfigMap changes nothing.
	o = &options{endpoint: "http://flag:4318", protocol: "grpc", set: map[string]bool{"otlp-endpoint": true, "otlp-protocol": true}}
	x = &exportSwitch{cur: first, endpoint: o.endpoint, protocol: o.protocol}
	made = nil
	x.reconfigure(log, o, nil, cfg("http://b:4317", "http/protobuf"), mk)
	if len(made) != 0 {
		t.Errorf("flags set: exporter made %v", made)
	}
	_ = x.Shutdown(context.Background())
}

// fakePayload records SetPayloadBytes calls.
type fakePayload struct {
	mu  sync.Mutex
	n   int
	set []int
	err error
}

func (f *fakePayload) PayloadBytes() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.n
}

func (f *fakePayload) SetPayloadBytes(n int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set = append(f.set, n)
	if f.err != nil {
		return f.err
	}
	f.n = n
	return nil
}

func (f *fakePayload) calls() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.set)
}

// TestLivePayload: clovisor_payload_bytes is applied to the tracer when it
// differs from the current prefix; a removed key returns to the default;
// --payload-bytes on the command line wins over the ConfigMap.
func TestLivePayload(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	free := &options{set: map[string]bool{}}
	f := &fakePayload{n: probes.DefaultPayload}
	livePayload(log, free, &podmap.LiveConfig{PayloadBytes: 300}, f)
	livePayload(log, free, &podmap.LiveConfig{PayloadBytes: 300}, f) // unchanged: no call
	livePayload(log, free, &podmap.LiveConfig{}, f)                  // key removed
	if got, want := f.calls(), []int{300, probes.DefaultPayload}; !slices.Equal(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
	pinned := &options{set: map[string]bool{"payload-bytes": true}}
	f = &fakePayload{n: 100}
	livePayload(log, pinned, &podmap.LiveConfig{PayloadBytes: 300}, f)
	if got := f.calls(); len(got) != 0 {
		t.Errorf("with --payload-bytes: calls %v, want none", got)
	}
	f = &fakePayload{n: 100, err: errors.New("refused")}
	livePayload(log, free, &podmap.LiveConfig{PayloadBytes: 300}, f)
	if f.PayloadBytes() != 100 {
		t.Errorf("prefix %d after a refused change, want 100", f.PayloadBytes())
	}
}
