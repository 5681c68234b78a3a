package main

// Kubernetes mode: the agent finds the pods of its node through the API
// server (podmap.Watcher), maps them to cgroups and veths on the host, and
// keeps the kernel's tables equal to what the selected pods need.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/clovisor/clovisor/podmap"
	"github.com/clovisor/clovisor/probes"
	"github.com/clovisor/clovisor/spans"
	"github.com/clovisor/clovisor/tcsessions"
)

// socketTables is what the Kubernetes mode changes in the socket tracer.
type socketTables interface {
	AddCgroup(id uint64) error
	RemoveCgroup(id uint64) error
}

// wireTables is what it changes in the wire tracer.
type wireTables interface {
	Attach(name string, role tcsessions.Role) error
	Detach(name string) error
	SetPort(p tcsessions.Port) error
	RemovePort(port uint16, iface string) error
	SetEgress(e tcsessions.EgressMatch) error
	RemoveEgress(prefix netip.Prefix, port uint16) error
	SetWorkload(name string, ips ...netip.Addr) error
	RemoveWorkload(name string) error
}

// Rescan periods of the cgroup hierarchy: soon while a selected pod's
// container or veth is still missing, else rarely (pod events trigger a
// scan anyway).
const (
	rescanPending = 300 * time.Millisecond
	rescanIdle    = 10 * time.Second
	// maxPendingRounds bounds the quick rescans (about 30 s): what is
	// still missing after them (a pod without processes or veth) is
	// looked for at the idle rate, and on every pod event.
	maxPendingRounds = 100
)

type egressKey struct {
	prefix netip.Prefix
	port   uint16
}

// kubeAgent reconciles the kernel's tables with the pods of the node.
type kubeAgent struct {
	log       *slog.Logger
	w         *podmap.Watcher
	h         *podmap.Hierarchy
	node      string
	sock      socketTables
	wire      wireTables // nil without wire tracing
	host      *netlink.Handle
	ignore    map[uint16]bool // server ports never put in the tables (the collector's)
	index     *podmap.Index
	filter    atomic.Pointer[wireFilter]
	maxPaylod int
	// onConfig is called with each new valid configuration (after the
	// first, which the caller read with initialConfig).
	onConfig func(old, cur *podmap.LiveConfig)

	mu        sync.Mutex // guards what follows; held by reconcile
	cfg       *podmap.LiveConfig
	cfgRV     string // resourceVersion of the ConfigMap last seen ("-" none)
	state     *podmap.State
	cgroups   map[uint64]*spans.K8s // applied: traced cgroup IDs
	veths     map[string]string     // applied: pod UID -> veth
	ports     map[uint16]string     // applied: server port -> protocol
	egress    map[egressKey]string  // applied: egress match -> protocol
	workloads map[string]bool       // applied: workload names (namespace/pod)
	vethErr   map[string]string     // pod UID -> last veth error (logged once)
	pending   bool                  // something selected is still missing
	// pendingRounds counts the reconciles in a row with pending set.
	pendingRounds int
}

func newKubeAgent(log *slog.Logger, w *podmap.Watcher, h *podmap.Hierarchy, node string, sock socketTables, wire wireTables,
	host *netlink.Handle, cfg *podmap.LiveConfig, cfgRV string) *kubeAgent {
	return &kubeAgent{
		log: log.With("component", "kubernetes"), w: w, h: h, node: node, sock: sock, wire: wire, host: host,
		ignore: map[uint16]bool{}, index: &podmap.Index{}, cfg: cfg, cfgRV: cfgRV,
		cgroups: map[uint64]*spans.K8s{}, veths: map[string]string{}, ports: map[uint16]string{},
		egress: map[egressKey]string{}, workloads: map[string]bool{}, vethErr: map[string]string{},
	}
}

// configMapVersion is the resourceVersion of a ConfigMap, "-" for none.
func configMapVersion(cm *corev1.ConfigMap) string {
	if cm == nil {
		return "-"
	}
	return cm.ResourceVersion
}

// readConfig parses the agent's ConfigMap (nil: the defaults).
func readConfig(cm *corev1.ConfigMap, maxPayload int) (*podmap.LiveConfig, error) {
	if cm == nil {
		return podmap.DefaultLiveConfig(), nil
	}
	return podmap.ParseConfigMap(cm.Data, maxPayload, tcsessions.Protocols)
}

// run reconciles after every change the watcher reports and on a timer,
// until ctx is done.
func (k *kubeAgent) run(ctx context.Context) {
	k.reconcile(ctx)
	t := time.NewTimer(rescanIdle)
	defer t.Stop()
	for {
		k.mu.Lock()
		next := rescanIdle
		if k.pending && k.pendingRounds < maxPendingRounds {
			next = rescanPending
		}
		k.mu.Unlock()
		t.Reset(next)
		select {
		case <-ctx.Done():
			return
		case <-k.w.Changed():
		case <-t.C:
		}
		k.reconcile(ctx)
	}
}

// reconcile brings the tables in line with the informers' view.
func (k *kubeAgent) reconcile(ctx context.Context) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.w.Synced() {
		k.pending = true
		return
	}
	k.applyConfigMap(ctx)
	st := podmap.Build(k.node, k.w.Snapshot(), k.cfg, k.state)
	k.state = st
	scanned, err := k.h.Scan()
	if err != nil {
		k.log.Warn("scanning the kubepods cgroups", "error", err.Error())
	}
	byPod := map[string][]podmap.ContainerCgroup{}
	for _, c := range scanned {
		byPod[c.PodUID] = append(byPod[c.PodUID], c)
	}
	pending := false

	// Cgroups of the selected pods' containers.
	want := map[uint64]*spans.K8s{}
	uids := make([]string, 0, len(st.Pods))
	for uid := range st.Pods {
		uids = append(uids, uid)
	}
	sort.Strings(uids)
	for _, uid := range uids {
		p := st.Pods[uid]
		if !p.Selected {
			continue
		}
		for _, c := range p.Containers {
			cg, ok := scanned[c.ID]
			if !ok || cg.PodUID != uid {
				if p.Running {
					pending = true
				}
				continue
			}
			want[cg.ID] = c.K8s
		}
	}
	for id := range k.cgroups {
		if _, ok := want[id]; !ok {
			if err := k.sock.RemoveCgroup(id); err != nil {
				k.log.Warn("untracing a cgroup", "cgroup_id", id, "error", err.Error())
			}
			delete(k.cgroups, id)
		}
	}
	for id, kk := range want {
		if _, ok := k.cgroups[id]; ok {
			k.cgroups[id] = kk
			continue
		}
		if err := k.sock.AddCgroup(id); err != nil {
			k.log.Warn("tracing a cgroup", "cgroup_id", id, "pod", kk.Namespace+"/"+kk.PodName, "error", err.Error())
			pending = true
			continue
		}
		k.cgroups[id] = kk
		k.log.Info("tracing container", "pod", kk.Namespace+"/"+kk.PodName, "container", kk.ContainerName, "cgroup_id", id)
	}

	byIface := map[string]*spans.K8s{}
	if k.wire != nil {
		pending = k.reconcileWire(st, byPod, byIface) || pending
	}
	byIP := map[netip.Addr]*spans.K8s{}
	for _, p := range st.Pods {
		if p.Selected {
			for _, ip := range p.IPs {
				byIP[ip] = p.K8s
			}
		}
	}
	cg := make(map[uint64]*spans.K8s, len(k.cgroups))
	for id, kk := range k.cgroups {
		cg[id] = kk
	}
	k.index.Set(&podmap.IndexData{ByCgroup: cg, ByInterface: byIface, ByIP: byIP, Peers: st.Peers, Hints: st.Hints})
	k.pending = pending
	if pending {
		k.pendingRounds++
	} else {
		k.pendingRounds = 0
	}
}

// reconcileWire attaches the selected running pods' veths, detaches the
// others', and fills the port, egress and workload tables. It reports
// whether something is still missing.
func (k *kubeAgent) reconcileWire(st *podmap.State, byPod map[string][]podmap.ContainerCgroup, byIface map[string]*spans.K8s) bool {
	pending := false
	for uid, veth := range k.veths {
		p := st.Pods[uid]
		if p != nil && p.Selected && p.Running {
			continue
		}
		if err := k.wire.Detach(veth); err != nil && !strings.Contains(err.Error(), "not traced") {
			k.log.Warn("detaching a pod veth", "interface", veth, "error", err.Error())
		}
		delete(k.veths, uid)
		k.log.Info("stopped tracing pod veth", "pod_uid", uid, "interface", veth)
	}
	workloads := map[string]bool{}
	for uid, p := range st.Pods {
		if !p.Selected || !p.Running {
			continue
		}
		if len(p.IPs) > 0 {
			workloads[p.Key()] = true
			if err := k.wire.SetWorkload(p.Key(), p.IPs...); err != nil {
				k.log.Warn("workload addresses", "pod", p.Key(), "error", err.Error())
			}
		}
		if veth, ok := k.veths[uid]; ok {
			byIface[veth] = p.K8s
			continue
		}
		pid := 0
		for _, cg := range byPod[uid] {
			if pids, err := k.h.Procs(cg.Path); err == nil && len(pids) > 0 {
				pid = pids[0]
				break
			}
		}
		var ip netip.Addr
		if len(p.IPs) > 0 {
			ip = p.IPs[0]
		}
		hi, err := podmap.FindHostVeth(k.host, pid, ip)
		if err == nil {
			err = k.wire.Attach(hi.Name, tcsessions.RolePod)
		}
		if err != nil {
			pending = true
			if k.vethErr[uid] != err.Error() {
				k.vethErr[uid] = err.Error()
				k.log.Info("pod veth not found yet", "pod", p.Key(), "pid", pid, "reason", err.Error())
			}
			continue
		}
		delete(k.vethErr, uid)
		k.veths[uid] = hi.Name
		byIface[hi.Name] = p.K8s
		k.log.Info("tracing pod veth", "pod", p.Key(), "interface", hi.Name, "ifindex", hi.Index, "found_by", hi.How)
	}
	for name := range k.workloads {
		if !workloads[name] {
			if err := k.wire.RemoveWorkload(name); err != nil {
				k.log.Warn("removing workload", "pod", name, "error", err.Error())
			}
		}
	}
	k.workloads = workloads

	for port := range k.ports {
		if _, ok := st.Ports[port]; !ok {
			if err := k.wire.RemovePort(port, ""); err != nil {
				k.log.Warn("removing a port", "port", port, "error", err.Error())
			}
			delete(k.ports, port)
		}
	}
	for port, proto := range st.Ports {
		if k.ignore[port] || k.ports[port] == proto {
			continue
		}
		if err := k.wire.SetPort(tcsessions.Port{Port: port, Protocol: proto}); err != nil {
			k.log.Warn("setting a port", "port", port, "protocol", proto, "error", err.Error())
			continue
		}
		k.ports[port] = proto
		k.log.Info("server port", "port", port, "protocol", proto)
	}

	want := map[egressKey]string{}
	var podRules []podmap.EgressRule
	for _, r := range k.cfg.Egress {
		proto := k.cfg.Protocols[r.Port]
		if proto == "" {
			proto = podmap.ProtoTCP
		}
		want[egressKey{r.Prefix, r.Port}] = proto
		if r.PodPrefix != "" {
			podRules = append(podRules, r)
		}
	}
	for key := range k.egress {
		if _, ok := want[key]; !ok {
			if err := k.wire.RemoveEgress(key.prefix, key.port); err != nil {
				k.log.Warn("removing an egress match", "prefix", key.prefix, "port", key.port, "error", err.Error())
			}
			delete(k.egress, key)
			k.log.Info("egress match removed", "prefix", key.prefix.String(), "port", key.port)
		}
	}
	for key, proto := range want {
		if k.egress[key] == proto {
			continue
		}
		if err := k.wire.SetEgress(tcsessions.EgressMatch{Prefix: key.prefix, Port: key.port, Protocol: proto}); err != nil {
			k.log.Warn("setting an egress match", "prefix", key.prefix, "port", key.port, "error", err.Error())
			continue
		}
		k.egress[key] = proto
		k.log.Info("egress match", "prefix", key.prefix.String(), "port", key.port, "protocol", proto)
	}
	f := &wireFilter{rules: podRules, ports: map[uint16]bool{}}
	for port := range k.ports {
		f.ports[port] = true
	}
	for key := range k.egress {
		limited := false
		for _, r := range podRules {
			if r.Prefix == key.prefix && r.Port == key.port {
				limited = true
			}
		}
		if !limited {
			f.egress = append(f.egress, key)
		}
	}
	k.filter.Store(f)
	return pending
}

// applyConfigMap takes a changed ConfigMap: a valid one replaces the
// configuration; an invalid one is logged and reported as a Kubernetes
// Event, and the last good configuration stays.
func (k *kubeAgent) applyConfigMap(ctx context.Context) {
	cm := k.w.ConfigMap()
	rv := configMapVersion(cm)
	if rv == k.cfgRV {
		return
	}
	k.cfgRV = rv
	cfg, err := readConfig(cm, k.maxPaylod)
	if err != nil {
		msg := fmt.Sprintf("invalid configuration rejected, the previous one stays in force: %v", err)
		k.log.Error("invalid ConfigMap rejected; keeping the last good configuration", "configmap", cm.Namespace+"/"+cm.Name,
			"resource_version", rv, "error", err.Error())
		evCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := k.w.Event(evCtx, cm, corev1.EventTypeWarning, "InvalidConfiguration", msg); err != nil {
			k.log.Warn("recording an event", "error", err.Error())
		}
		return
	}
	old := k.cfg
	k.cfg = cfg
	k.log.Info("configuration applied", "resource_version", rv, "labels", cfg.Labels.String(), "egress_matches", len(cfg.Egress),
		"endpoint", cfg.Endpoint, "protocol_overrides", len(cfg.Protocols))
	if k.onConfig != nil {
		k.onConfig(old, cfg)
	}
	if cm != nil {
		evCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := k.w.Event(evCtx, cm, corev1.EventTypeNormal, "ConfigurationApplied",
			fmt.Sprintf("configuration (resourceVersion %s) applied on node %s", rv, k.node)); err != nil {
			k.log.Warn("recording an event", "error", err.Error())
		}
	}
}

// wireFilter is what keepWire needs, published whole after each reconcile
// so that the wire pipeline never waits for one.
type wireFilter struct {
	rules  []podmap.EgressRule // egress rules limited to pods by name prefix
	ports  map[uint16]bool     // server ports in the table
	egress []egressKey         // egress matches not limited to pods
}

// keepWire reports whether a wire exchange is wanted: exchanges with a
// server that only egress rules limited to other pods matched are not.
func (k *kubeAgent) keepWire(ex *tcsessions.Exchange) bool {
	f := k.filter.Load()
	if f == nil || len(f.rules) == 0 || ex.Role != tcsessions.RolePod {
		return true
	}
	srv := ex.Server.Addr().Unmap()
	matched := false
	for _, r := range f.rules {
		if (r.Port == 0 || r.Port == ex.Server.Port()) && r.Prefix.Contains(srv) {
			if d := k.index.Data(); d != nil {
				if pod := d.ByInterface[ex.Interface]; pod != nil && strings.HasPrefix(pod.PodName, r.PodPrefix) {
					return true
				}
			}
			matched = true
		}
	}
	if !matched || f.ports[ex.Server.Port()] {
		return true
	}
	for _, key := range f.egress {
		if (key.port == 0 || key.port == ex.Server.Port()) && key.prefix.Contains(srv) {
			return true
		}
	}
	return false
}

// hostNetlink opens a netlink handle in the network namespace the wire
// tracer works in ("" : the agent's own).
func hostNetlink(path string) (*netlink.Handle, error) {
	if path == "" {
		return netlink.NewHandle()
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns)
}

// kubeOptions are the Kubernetes mode's flags.
type kubeOptions struct {
	mode        string // auto, true, false
	kubeconfig  string
	nodeName    string
	namespace   string
	configMap   string
	cgroupRoots listFlag
	syncTimeout time.Duration
}

func (k *kubeOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&k.mode, "kubernetes", "auto", "Kubernetes mode: auto (when in-cluster credentials or a kubeconfig exist), true or false")
	fs.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, else in-cluster credentials)")
	fs.StringVar(&k.nodeName, "node-name", "", "this node's name (default: $NODE_NAME, else the host name)")
	fs.StringVar(&k.namespace, "namespace", "", "the agent's namespace, where its ConfigMap is (default: $POD_NAMESPACE, else the service account's, else "+podmap.DefaultNamespace+")")
	fs.StringVar(&k.configMap, "configmap", podmap.DefaultConfigMap, "the agent's ConfigMap")
	fs.Var(&k.cgroupRoots, "kube-cgroup-root", "kubepods cgroup directories (v2 paths; default: kubepods and kubepods.slice found in the cgroup2 mount)")
	fs.DurationVar(&k.syncTimeout, "kube-sync-timeout", 10*time.Second, "how long to wait at start for the API server before starting with the defaults")
}

func (k *kubeOptions) check() error {
	switch k.mode {
	case "auto", "true", "false":
		return nil
	}
	return fmt.Errorf("--kubernetes=%s: want auto, true or false", k.mode)
}

// kubeSetup is the Kubernetes mode's start: credentials, node name,
// informers synced (or not yet, when the API server is unreachable: the
// agent then starts with the defaults and the informers go on retrying).
type kubeSetup struct {
	watcher *podmap.Watcher
	node    string
	cfg     *podmap.LiveConfig
	cfgRV   string
}

// startKube connects to the cluster when there are credentials. It
// returns nil, nil in plain-host mode.
func startKube(ctx context.Context, o *options, log *slog.Logger, maxPayload int) (*kubeSetup, error) {
	if o.kube.mode == "false" {
		return nil, nil
	}
	rc, source, err := podmap.RestConfig(o.kube.kubeconfig)
	if errors.Is(err, podmap.ErrNotKubernetes) {
		if o.kube.mode == "true" {
			return nil, fmt.Errorf("--kubernetes=true: %w (set --kubeconfig, KUBECONFIG, or run in a pod)", err)
		}
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	rc.UserAgent = "clovisor"
	node, nodeSource, err := podmap.NodeName(o.kube.nodeName)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	ns := podmap.AgentNamespace(o.kube.namespace)
	w := podmap.NewWatcher(client, podmap.WatcherOptions{Node: node, Namespace: ns, ConfigMap: o.kube.configMap, Logger: log})
	log.Info("kubernetes mode", "component", "kubernetes", "credentials", source, "server", rc.Host, "node", node,
		"node_from", nodeSource, "configmap", ns+"/"+o.kube.configMap, "cgroup_mode", podmap.CgroupMode())
	w.Start(ctx)
	go w.Monitor(ctx, 2*time.Second)
	syncCtx, cancel := context.WithTimeout(ctx, o.kube.syncTimeout)
	defer cancel()
	ks := &kubeSetup{watcher: w, node: node, cfg: podmap.DefaultLiveConfig(), cfgRV: ""}
	if !w.WaitForSync(syncCtx) {
		log.Warn("kubernetes API not synced yet; starting with the default configuration and retrying in the background",
			"component", "kubernetes", "waited", o.kube.syncTimeout.String())
		return ks, nil
	}
	cm := w.ConfigMap()
	cfg, err := readConfig(cm, maxPayload)
	if err != nil {
		log.Error("invalid ConfigMap at start; using the defaults until it is fixed", "component", "kubernetes", "error", err.Error())
		if cm != nil {
			_ = w.Event(ctx, cm, corev1.EventTypeWarning, "InvalidConfiguration",
				fmt.Sprintf("invalid configuration rejected, the defaults are in force: %v", err))
		}
		ks.cfgRV = configMapVersion(cm)
		return ks, nil
	}
	ks.cfg, ks.cfgRV = cfg, configMapVersion(cm)
	return ks, nil
}

// apply lets the ConfigMap fill what the command line left unset: the
// payload prefix, and the exporter's endpoint and protocol.
func (ks *kubeSetup) apply(o *options) {
	if ks.cfg.PayloadBytes > 0 && !o.set["payload-bytes"] {
		o.payloadBytes = ks.cfg.PayloadBytes
	}
	if ks.cfg.Endpoint != "" && !o.set["otlp-endpoint"] {
		o.endpoint = ks.cfg.Endpoint
		if o.output == "" {
			o.output = spans.OutputOTLP
		}
	}
	if ks.cfg.Protocol != "" && !o.set["otlp-protocol"] {
		o.protocol = ks.cfg.Protocol
	}
}

// agent makes the reconciler of the Kubernetes mode.
func (ks *kubeSetup) agent(log *slog.Logger, o *options, sock socketTables, wire wireTables, netnsPath string,
	index *podmap.Index, onConfig func(old, cur *podmap.LiveConfig)) (*kubeAgent, error) {
	h, err := podmap.NewHierarchy("", o.kube.cgroupRoots...)
	if err != nil {
		return nil, fmt.Errorf("kubepods cgroups: %w", err)
	}
	var host *netlink.Handle
	if wire != nil {
		if host, err = hostNetlink(netnsPath); err != nil {
			return nil, err
		}
	}
	ka := newKubeAgent(log, ks.watcher, h, ks.node, sock, wire, host, ks.cfg, ks.cfgRV)
	ka.index = index
	ka.maxPaylod = probes.MaxPayload
	ka.onConfig = onConfig
	if p := collectorPort(o.endpoint, o.protocol); p != 0 {
		ka.ignore[p] = true
	}
	return ka, nil
}

// payloadSetter is the socket tracer's run-time payload prefix.
type payloadSetter interface {
	PayloadBytes() int
	SetPayloadBytes(n int) error
}

// livePayload applies the ConfigMap's clovisor_payload_bytes to the loaded
// programs at once (no restart), unless --payload-bytes was given: that
// wins. A key removed from the ConfigMap returns to the flag's default.
func livePayload(log *slog.Logger, o *options, cur *podmap.LiveConfig, tr payloadSetter) {
	if o.set["payload-bytes"] {
		return
	}
	n := cur.PayloadBytes
	if n == 0 {
		n = probes.DefaultPayload
	}
	prev := tr.PayloadBytes()
	if n == prev {
		return
	}
	if err := tr.SetPayloadBytes(n); err != nil {
		log.Error("clovisor_payload_bytes not applied", "component", "kubernetes", "configured", n, "error", err.Error())
		return
	}
	log.Info("payload prefix changed", "component", "kubernetes", "payload_bytes", n, "previous", prev)
}

// exportSwitch hands sessions to the current Exporter; a new exporter
// endpoint in the ConfigMap replaces it without a restart.
type exportSwitch struct {
	mu  sync.RWMutex
	cur *spans.Exporter
	// endpoint and protocol the current exporter was made with.
	endpoint, protocol string
}

// Export implements the sessions' sink.
func (x *exportSwitch) Export(s *spans.Session) {
	x.mu.RLock()
	x.cur.Export(s)
	x.mu.RUnlock()
}

// Shutdown flushes and stops the current exporter.
func (x *exportSwitch) Shutdown(ctx context.Context) error {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.cur.Shutdown(ctx)
}

// reconfigure replaces the exporter when the ConfigMap's endpoint or
// protocol changed (and the command line does not fix them); the old one
// is flushed in the background.
func (x *exportSwitch) reconfigure(log *slog.Logger, o *options, old, cur *podmap.LiveConfig,
	mk func(endpoint, protocol string) (*spans.Exporter, error)) {
	log = log.With("component", "kubernetes")
	// Unless fixed by a flag, endpoint and protocol are the ConfigMap's
	// now: o holds the values the ConfigMap had at start (kubeSetup.apply),
	// which a later edit that drops the keys must not bring back. Without
	// an endpoint the current exporter stays.
	endpoint, protocol := o.endpoint, o.protocol
	if !o.set["otlp-endpoint"] {
		endpoint = cur.Endpoint
	}
	if !o.set["otlp-protocol"] {
		protocol = cur.Protocol
	}
	x.mu.RLock()
	same := x.endpoint == endpoint && x.protocol == protocol
	x.mu.RUnlock()
	if same || endpoint == "" {
		return
	}
	next, err := mk(endpoint, protocol)
	if err != nil {
		log.Error("new exporter endpoint rejected; keeping the current one", "endpoint", endpoint, "error", err.Error())
		return
	}
	x.mu.Lock()
	prev := x.cur
	x.cur, x.endpoint, x.protocol = next, endpoint, protocol
	x.mu.Unlock()
	log.Info("exporter endpoint changed", "endpoint", endpoint, "protocol", protocol)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := prev.Shutdown(ctx); err != nil {
			log.Warn("flushing the previous exporter", "error", err.Error())
		}
	}()
}
