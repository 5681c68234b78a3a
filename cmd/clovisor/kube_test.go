package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/clovisor/clovisor/internal/testbed"
)

// jsonSpan is one line of --output=json.
type jsonSpan struct {
	Name       string         `json:"name"`
	Kind       string         `json:"kind"`
	Attributes map[string]any `json:"attributes"`
	Resource   map[string]any `json:"resource"`
}

func parseSpans(t *testing.T, out string) []jsonSpan {
	t.Helper()
	var spans []jsonSpan
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var s jsonSpan
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		spans = append(spans, s)
	}
	return spans
}

// findSpans returns the spans whose resource and attributes hold every
// key=value of want ("res:" keys are resource attributes).
func findSpans(spans []jsonSpan, want map[string]string) []jsonSpan {
	var out []jsonSpan
next:
	for _, s := range spans {
		for k, v := range want {
			var got any
			if rk, ok := strings.CutPrefix(k, "res:"); ok {
				got = s.Resource[rk]
			} else if k == "kind" {
				got = s.Kind
			} else {
				got = s.Attributes[k]
			}
			if fmt.Sprint(got) != v {
				continue next
			}
		}
		out = append(out, s)
	}
	return out
}

// agentMap opens the BPF map of the agent process named name.
func agentMap(t *testing.T, pid int, name string) *ebpf.Map {
	t.Helper()
	objs, err := testbed.BPFObjectsOf(pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range objs.Maps {
		m, err := ebpf.NewMapFromID(ebpf.MapID(id))
		if err != nil {
			continue
		}
		if info, err := m.Info(); err == nil && info.Name == name {
			t.Cleanup(func() { m.Close() })
			return m
		}
		m.Close()
	}
	t.Fatalf("agent %d holds no map %q", pid, name)
	return nil
}

// tracedCgroups lists the keys of the socket tracer's traced_cgroups map.
func tracedCgroups(t *testing.T, m *ebpf.Map) map[uint64]bool {
	t.Helper()
	out := map[uint64]bool{}
	var k uint64
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = true
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// portTable reads dports2proto: port (all interfaces) -> protocol id.
func portTable(t *testing.T, m *ebpf.Map) map[uint16]uint32 {
	t.Helper()
	out := map[uint16]uint32{}
	var k [8]byte
	var v uint32
	it := m.Iterate()
	for it.Next(&k, &v) {
		if binary.NativeEndian.Uint32(k[:4]) == 0 {
			out[binary.NativeEndian.Uint16(k[4:6])] = v
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// egressTable reads egress_lookup_table as "prefix:port" strings.
func egressTable(t *testing.T, m *ebpf.Map) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	var k [24]byte
	var v uint32
	it := m.Iterate()
	for it.Next(&k, &v) {
		bits := int(binary.NativeEndian.Uint32(k[:4])) - 16
		port := uint16(k[4])<<8 | uint16(k[5])
		a := netip.AddrFrom16([16]byte(k[6:22]))
		p := netip.PrefixFrom(a, bits)
		if a.Is4In6() {
			p = netip.PrefixFrom(a.Unmap(), bits-96)
		}
		out[fmt.Sprintf("%s:%d", p, port)] = true
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func waitUntil(t *testing.T, a *agent, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s\nagent output:\n%s\nagent log:\n%s", what, a.stdout.String(), a.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

const kubeBaseManifest = `apiVersion: v1
kind: Namespace
metadata: {name: clovisor}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: clovisor, namespace: clovisor}
data:
  clovisor_labels: "shop"
  clovisor_egress_match: "%[2]s:9999:web"
---
apiVersion: v1
kind: Pod
metadata:
  name: web-5d9c7b8f6c-abcde
  namespace: shop
  labels: {app.kubernetes.io/name: web, pod-template-hash: 5d9c7b8f6c}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: web-5d9c7b8f6c, uid: 0b7c5e7a-2d3f-4a6b-9c1d-2e3f4a5b6c7d, controller: true}
spec:
  nodeName: %[1]s
  containers:
  - name: nginx
    image: nginx
    ports: [{name: web, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app.kubernetes.io/name: web}
  ports: [{name: web, port: 80, targetPort: web}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  labels: {app: client}
spec:
  nodeName: %[1]s
  containers: [{name: curl, image: curl}]
---
apiVersion: v1
kind: Pod
metadata:
  name: outsider
  namespace: other
  labels: {app: outsider}
spec:
  nodeName: %[1]s
  containers: [{name: curl, image: curl}]
`

// TestKubernetes runs the agent binary against a real kube-apiserver with a
// simulated node (pods as network namespaces and kubepods cgroups, with
// nginx and curl in them), once per cgroup driver layout.
func TestKubernetes(t *testing.T) {
	for _, d := range []testbed.CgroupDriver{testbed.CgroupfsDriver, testbed.SystemdDriver} {
		t.Run(d.String(), func(t *testing.T) { testKubernetes(t, d) })
	}
}

func testKubernetes(t *testing.T, driver testbed.CgroupDriver) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	testbed.RequireTool(t, "nginx")
	// Open watches would hold a stopping API server until it is killed.
	k := testbed.StartKube(t, testbed.KubeOptions{APIServerFlags: []string{"--shutdown-watch-termination-grace-period=1s"}})
	const node = "node-1"
	n := testbed.NewKubeNode(t, k, node, driver)
	outside := n.Net.OutsideIP
	k.Apply(t, fmt.Sprintf(kubeBaseManifest, node, outside))

	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "index.html"), []byte("<h1>shop</h1>\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	testbed.StartNginx(t, n.Net.Outside, 9999, root, outside)
	conf := filepath.Join(t.TempDir(), "clovisor.yaml")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("wire:\n  netns: %s\n  nodeInterfaces: []\n", n.Net.NS.Path())), 0o644); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, []string{"KUBECONFIG=", "NODE_NAME=", "OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="},
		"--wire=true", "--kubeconfig="+k.Kubeconfig(), "--node-name="+node, "--namespace=clovisor",
		"--kube-cgroup-root="+n.CgroupRoot(), "--config="+conf, "--output=json")
	if !strings.Contains(a.stderr.String(), "msg=\"kubernetes mode\"") {
		t.Fatalf("agent not in Kubernetes mode:\n%s", a.stderr.String())
	}
	pid := a.cmd.Process.Pid
	cgMap, portMap, egMap := agentMap(t, pid, "traced_cgroups"), agentMap(t, pid, "dports2proto"), agentMap(t, pid, "egress_lookup_t")

	web := n.RunPod(t, "shop", "web-5d9c7b8f6c-abcde", map[string]testbed.PodProcess{"nginx": {Port: 8080, Root: root}})
	client := n.RunPod(t, "shop", "client", nil)
	outsider := n.RunPod(t, "other", "outsider", nil)

	// The selected pods' containers and veths are traced, the other's not.
	waitUntil(t, a, "the shop pods' cgroups in traced_cgroups", 10*time.Second, func() bool {
		cg := tracedCgroups(t, cgMap)
		return cg[web.Containers["nginx"].ID()] && cg[client.Containers["curl"].ID()]
	})
	waitUntil(t, a, "tc programs on the shop pods' veths", 10*time.Second, func() bool {
		return tcPrograms(t, n.Net.NS, web.Net.HostVeth) == 2 && tcPrograms(t, n.Net.NS, client.Net.HostVeth) == 2
	})
	if cg := tracedCgroups(t, cgMap); len(cg) != 2 || cg[outsider.Containers["curl"].ID()] {
		t.Errorf("traced cgroups %v: want exactly web's and client's", cg)
	}
	if got := tcPrograms(t, n.Net.NS, outsider.Net.HostVeth); got != 0 {
		t.Errorf("%d tc programs on the unselected pod's veth", got)
	}
	if got := portTable(t, portMap); len(got) != 1 || got[8080] != 0 {
		t.Errorf("dports2proto %v, want 8080 -> 0 (tcp: the Service port is named \"web\")", got)
	}

	url := fmt.Sprintf("http://%s/index.html", netip.AddrPortFrom(web.Net.IP, 8080))
	client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", url)
	outsider.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", url+"?from=outsider")
	sockServer := map[string]string{"kind": "SERVER", "clovisor.point": "socket", "url.path": "/index.html",
		"res:k8s.pod.name": web.Name, "res:k8s.namespace.name": "shop", "res:k8s.container.name": "nginx",
		"res:container.id": web.ContainerIDs["nginx"], "res:k8s.pod.uid": web.UID, "res:k8s.node.name": node,
		"res:k8s.deployment.name": "web", "res:k8s.replicaset.name": "web-5d9c7b8f6c", "res:service.name": "web",
		"clovisor.peer.k8s.pod.name": "client", "clovisor.peer.k8s.namespace.name": "shop"}
	sockClient := map[string]string{"kind": "CLIENT", "clovisor.point": "socket", "url.path": "/index.html",
		"res:k8s.pod.name": "client", "res:k8s.container.name": "curl", "res:service.name": "client",
		"res:container.id": client.ContainerIDs["curl"], "clovisor.peer.k8s.pod.name": web.Name,
		"clovisor.peer.k8s.service.name": "web", "http.response.status_code": "200"}
	wireWeb := map[string]string{"clovisor.point": "pod_veth", "network.interface.name": web.Net.HostVeth, "url.path": "/index.html",
		"res:k8s.pod.name": web.Name, "res:service.name": "web", "clovisor.peer.k8s.pod.name": "client"}
	wireClient := map[string]string{"clovisor.point": "pod_veth", "network.interface.name": client.Net.HostVeth, "url.path": "/index.html",
		"res:k8s.pod.name": "client", "res:service.name": "client", "clovisor.peer.k8s.pod.name": web.Name}
	waitUntil(t, a, "the socket and wire spans of the client's request", 15*time.Second, func() bool {
		sp := parseSpans(t, a.stdout.String())
		return len(findSpans(sp, sockServer)) == 1 && len(findSpans(sp, sockClient)) == 1 &&
			len(findSpans(sp, wireWeb)) == 1 && len(findSpans(sp, wireClient)) == 1
	})
	// The unselected pod's request shows only as web's server span (the
	// server is traced), never with the outsider as the traced workload.
	time.Sleep(300 * time.Millisecond)
	for _, s := range parseSpans(t, a.stdout.String()) {
		if s.Resource["k8s.pod.name"] == "outsider" || s.Resource["k8s.namespace.name"] == "other" {
			t.Errorf("span of the unselected pod: %+v", s)
		}
	}

	// A Service port named http-web switches the port to HTTP: requests
	// that payload detection does not take for HTTP (an SSDP-style
	// "M-SEARCH * HTTP/1.1") are parsed as HTTP from then on, at the
	// socket and on the wire.
	msearch := func(q string) {
		client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", "-X", "M-SEARCH", "--request-target", "*",
			"-H", "X-Try: "+q, fmt.Sprintf("http://%s/", netip.AddrPortFrom(web.Net.IP, 8080)))
	}
	msearch("before")
	time.Sleep(time.Second)
	if got := findSpans(parseSpans(t, a.stdout.String()), map[string]string{"http.request.method_original": "M-SEARCH"}); len(got) != 0 {
		t.Errorf("M-SEARCH parsed as HTTP before the port was named http: %+v", got)
	}
	k.Kubectl(t, "patch", "service", "-n", "shop", "web", "--type=json",
		`-p=[{"op":"replace","path":"/spec/ports/0/name","value":"http-web"}]`)
	waitUntil(t, a, "port 8080 -> http (1) in dports2proto", 10*time.Second, func() bool {
		return portTable(t, portMap)[8080] == 1
	})
	time.Sleep(200 * time.Millisecond) // the same reconcile then publishes the socket hints
	msearch("after")
	waitUntil(t, a, "M-SEARCH spans at the socket (both ends) and on the wire", 10*time.Second, func() bool {
		sp := findSpans(parseSpans(t, a.stdout.String()), map[string]string{"http.request.method_original": "M-SEARCH", "url.path": "*"})
		return len(findSpans(sp, map[string]string{"kind": "SERVER", "clovisor.point": "socket", "res:k8s.pod.name": web.Name})) == 1 &&
			len(findSpans(sp, map[string]string{"kind": "CLIENT", "clovisor.point": "socket", "res:k8s.pod.name": "client"})) == 1 &&
			len(findSpans(sp, map[string]string{"clovisor.point": "pod_veth", "network.interface.name": web.Net.HostVeth})) == 1
	})

	// The ConfigMap's egress match is in the table; limited to pods named
	// web*, the client's exchanges with that server are not reported.
	if eg := egressTable(t, egMap); !eg[fmt.Sprintf("%s/32:9999", outside)] || len(eg) != 1 {
		t.Errorf("egress table %v, want %s/32:9999", eg, outside)
	}
	outURL := fmt.Sprintf("http://%s/index.html", netip.AddrPortFrom(outside, 9999))
	outSpan := map[string]string{"clovisor.point": "pod_veth", "network.interface.name": client.Net.HostVeth, "server.port": "9999"}
	client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", outURL)
	// An edit applies live: the rule now names the client's pods.
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge",
		fmt.Sprintf(`-p={"data":{"clovisor_egress_match":"%s/24:9999:client"}}`, outside))
	waitUntil(t, a, "the edited egress match in the table", 10*time.Second, func() bool {
		eg := egressTable(t, egMap)
		return len(eg) == 1 && eg[netip.PrefixFrom(outside, 24).Masked().String()+":9999"]
	})
	if n := len(findSpans(parseSpans(t, a.stdout.String()), outSpan)); n != 0 {
		t.Errorf("%d wire spans of the client to %s before the edit named its pods", n, outURL)
	}
	client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", outURL+"?after=edit")
	waitUntil(t, a, "the client's wire span to the egress server", 10*time.Second, func() bool {
		return len(findSpans(parseSpans(t, a.stdout.String()), map[string]string{"clovisor.point": "pod_veth",
			"network.interface.name": client.Net.HostVeth, "server.port": "9999", "url.query": "after=edit"})) == 1
	})

	// An invalid edit is rejected with a log line and an Event; the last
	// good configuration stays (the egress match, the traced pods).
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge",
		`-p={"data":{"clovisor_labels":"Not A Namespace!"}}`)
	waitUntil(t, a, "the invalid ConfigMap rejected", 10*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), "invalid ConfigMap rejected")
	})
	waitUntil(t, a, "an InvalidConfiguration event", 10*time.Second, func() bool {
		return strings.Contains(k.Kubectl(t, "get", "events", "-n", "clovisor", "--field-selector=reason=InvalidConfiguration",
			"-o=jsonpath={.items[*].message}"), "clovisor_labels")
	})
	if eg := egressTable(t, egMap); len(eg) != 1 {
		t.Errorf("egress table after the invalid edit: %v", eg)
	}
	client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", url+"?after=invalid")
	waitUntil(t, a, "spans after the invalid edit", 10*time.Second, func() bool {
		return len(findSpans(parseSpans(t, a.stdout.String()), map[string]string{"kind": "SERVER", "clovisor.point": "socket", "url.query": "after=invalid",
			"res:k8s.pod.name": web.Name})) == 1
	})

	// A valid edit after it applies: the other namespace's pod is selected
	// now, and traced.
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge",
		`-p={"data":{"clovisor_labels":"shop,other:app=outsider"}}`)
	waitUntil(t, a, "the newly selected pod traced", 10*time.Second, func() bool {
		return tracedCgroups(t, cgMap)[outsider.Containers["curl"].ID()] && tcPrograms(t, n.Net.NS, outsider.Net.HostVeth) == 2
	})

	// A deleted pod leaves no tc programs and no map entries.
	webCG := web.Containers["nginx"].ID()
	k.Kubectl(t, "delete", "pod", "-n", "shop", web.Name, "--grace-period=0", "--force", "--wait=true")
	waitUntil(t, a, "the deleted pod untraced", 10*time.Second, func() bool {
		return !tracedCgroups(t, cgMap)[webCG] && tcPrograms(t, n.Net.NS, web.Net.HostVeth) == 0 && len(portTable(t, portMap)) == 0
	})
	if q := n.Net.NS.Exec(t, "tc", "qdisc", "show", "dev", web.Net.HostVeth); strings.Contains(q, "clsact") {
		t.Errorf("clsact qdisc left on the deleted pod's veth: %s", q)
	}
	web.Stop(t)

	// The API server goes away; pods created meanwhile (before the
	// agent's watches are back) are picked up.
	k.StopAPIServer(t)
	waitUntil(t, a, "the agent to notice the API server is gone", 20*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), "kubernetes API server unreachable")
	})
	time.Sleep(2 * time.Second)
	k.StartAPIServer(t)
	k.Apply(t, fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: late, namespace: shop, labels: {app: late}}
spec:
  nodeName: %s
  containers: [{name: nginx, image: nginx}]
`, node))
	late := n.RunPod(t, "shop", "late", map[string]testbed.PodProcess{"nginx": {Port: 8080, Root: root}})
	waitUntil(t, a, "the agent to see the API server back", 20*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), "kubernetes API server reachable again")
	})
	waitUntil(t, a, "the pod created around the restart traced", 30*time.Second, func() bool {
		return tracedCgroups(t, cgMap)[late.Containers["nginx"].ID()] && tcPrograms(t, n.Net.NS, late.Net.HostVeth) == 2
	})
	client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", fmt.Sprintf("http://%s/index.html?late=1", netip.AddrPortFrom(late.Net.IP, 8080)))
	waitUntil(t, a, "spans of the late pod", 10*time.Second, func() bool {
		return len(findSpans(parseSpans(t, a.stdout.String()), map[string]string{"kind": "SERVER", "clovisor.point": "socket", "url.query": "late=1",
			"res:k8s.pod.name": "late", "res:service.name": "late"})) == 1
	})
	a.stop(t)
	if strings.Contains(a.stderr.String(), "panic") {
		t.Errorf("agent log mentions a panic:\n%s", a.stderr.String())
	}
}

// TestKubernetesAPIUnreachable: with an API server that does not answer,
// the agent starts anyway (the defaults), says so, and keeps retrying.
func TestKubernetesAPIUnreachable(t *testing.T) {
	testbed.RequireRoot(t)
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	port := testbed.FreePort(t)
	if err := os.WriteFile(kc, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:%d", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`, port)), 0o600); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, []string{"KUBECONFIG=", "NODE_NAME="}, "--kubeconfig="+kc, "--node-name=n1", "--kube-sync-timeout=1s", "--output=json")
	waitUntil(t, a, "the unreachable API server reported", 10*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), "kubernetes API not synced yet; starting with the default configuration") &&
			strings.Contains(a.stderr.String(), "kubernetes API server unreachable")
	})
	a.stop(t)
}

func TestKubernetesBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--kubernetes=maybe"}, "--kubernetes=maybe: want auto, true or false"},
		{[]string{"--kubeconfig=/no/such/kubeconfig"}, "/no/such/kubeconfig"},
		{[]string{"--kubernetes=true"}, "--kubernetes=true: no in-cluster credentials and no kubeconfig"},
	} {
		cmd := exec.Command(agentBin, c.args...)
		cmd.Env = append(os.Environ(), "KUBECONFIG=", "KUBERNETES_SERVICE_HOST=")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("%v: exit %v, output %s; want an error naming %q", c.args, err, out, c.want)
		}
	}
}
