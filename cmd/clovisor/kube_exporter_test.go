package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

const kubeExporterManifest = `apiVersion: v1
kind: Namespace
metadata: {name: clovisor}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: clovisor, namespace: clovisor}
data:
  clovisor_labels: "shop"
  clovisor_exporter_endpoint: "%[2]s"
  clovisor_exporter_protocol: "http/protobuf"
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  nodeName: %[1]s
  containers: [{name: nginx, image: nginx, ports: [{containerPort: 8080}]}]
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
`

// exchangeSpans returns the socket spans of the curl -> nginx exchange for
// path that Jaeger j holds: the server's (service web) and the client's
// (service client). A span counts only with its pod's k8s attributes.
func exchangeSpans(t *testing.T, j *testbed.Jaeger, path string) (server, client []testbed.Span) {
	t.Helper()
	pick := func(service, pod, container, kind string) []testbed.Span {
		spans, err := j.Spans(service)
		if err != nil {
			t.Fatalf("querying Jaeger for %s: %v", service, err)
		}
		var out []testbed.Span
		for _, s := range spans {
			if p, ok := s.Tag("url.path"); !ok || p.String() != path {
				continue
			}
			k, _ := s.Tag("span.kind")
			pn, _ := s.Process.Tag("k8s.pod.name")
			ns, _ := s.Process.Tag("k8s.namespace.name")
			cn, _ := s.Process.Tag("k8s.container.name")
			pt, _ := s.Tag("clovisor.point")
			if s.OperationName != "GET" || k.String() != kind || pn.String() != pod || ns.String() != "shop" ||
				cn.String() != container || pt.String() != "socket" {
				t.Errorf("span for %s in service %s: name %q kind %v point %v pod %v namespace %v container %v; want GET %s socket shop/%s %s",
					path, service, s.OperationName, k.Value, pt.Value, pn.Value, ns.Value, cn.Value, kind, pod, container)
				continue
			}
			out = append(out, s)
		}
		return out
	}
	return pick("web", "web", "nginx", "server"), pick("client", "client", "curl", "client")
}

// TestKubernetesExporterSwitch: an edit of the agent's ConfigMap moves the
// span export from one real Jaeger to another, live (same agent process);
// spans go only where the configuration said at the time; an invalid
// endpoint is rejected (log line and Event) and export goes on unchanged.
func TestKubernetesExporterSwitch(t *testing.T) {
	testbed.RequireRoot(t)
	testbed.RequireTool(t, "curl")
	testbed.RequireTool(t, "nginx")
	start := time.Now()
	// The two Jaegers start while the API server does (a failed start
	// sends nil: the deferred send runs as StartJaeger's Fatal unwinds).
	jc := make(chan *testbed.Jaeger, 2)
	for range 2 {
		go func() {
			var j *testbed.Jaeger
			defer func() { jc <- j }()
			j = testbed.StartJaeger(t)
		}()
	}
	k := testbed.StartKube(t, testbed.KubeOptions{})
	ja, jb := <-jc, <-jc
	if ja == nil || jb == nil {
		t.FailNow()
	}
	const node = "node-1"
	n := testbed.NewKubeNode(t, k, node, testbed.CgroupfsDriver)
	k.Apply(t, fmt.Sprintf(kubeExporterManifest, node, ja.OTLPHTTPEndpoint()))
	root := t.TempDir()
	for _, f := range []string{"a.html", "b.html", "c.html", "d.html"} {
		if err := os.WriteFile(filepath.Join(root, f), []byte(f+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("setup %v", time.Since(start).Round(time.Millisecond))

	// No --output and no collector flags or variables: the ConfigMap names
	// the collector.
	a := startAgent(t, []string{"KUBECONFIG=", "NODE_NAME=", "OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=",
		"OTEL_EXPORTER_OTLP_PROTOCOL=", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=", "OTEL_BSP_SCHEDULE_DELAY=200"},
		"--wire=false", "--kubeconfig="+k.Kubeconfig(), "--node-name="+node, "--namespace=clovisor", "--kube-cgroup-root="+n.CgroupRoot())
	pid := a.cmd.Process.Pid
	cgMap := agentMap(t, pid, "traced_cgroups")
	web := n.RunPod(t, "shop", "web", map[string]testbed.PodProcess{"nginx": {Port: 8080, Root: root}})
	client := n.RunPod(t, "shop", "client", nil)
	waitUntil(t, a, "the shop pods' cgroups in traced_cgroups", 10*time.Second, func() bool {
		cg := tracedCgroups(t, cgMap)
		return cg[web.Containers["nginx"].ID()] && cg[client.Containers["curl"].ID()]
	})
	get := func(file string) {
		client.Exec(t, "curl", "curl", "-sS", "-o", "/dev/null", fmt.Sprintf("http://%s/%s", netip.AddrPortFrom(web.Net.IP, 8080), file))
	}
	// waitIn waits until j holds exactly one server and one client span of
	// the exchange for path.
	waitIn := func(j *testbed.Jaeger, name, path string) time.Duration {
		t.Helper()
		t0 := time.Now()
		waitUntil(t, a, "the exchange for "+path+" in Jaeger "+name, 15*time.Second, func() bool {
			s, c := exchangeSpans(t, j, path)
			return len(s) == 1 && len(c) == 1
		})
		return time.Since(t0)
	}
	// absent checks that j holds no span of the exchange for path.
	absent := func(j *testbed.Jaeger, name, path string) {
		t.Helper()
		if s, c := exchangeSpans(t, j, path); len(s)+len(c) != 0 {
			t.Errorf("Jaeger %s holds %d server and %d client spans for %s, want none", name, len(s), len(c), path)
		}
	}

	// 1. The ConfigMap points at A (OTLP/HTTP).
	get("a.html")
	t.Logf("a.html in A after %v", waitIn(ja, "A", "/a.html").Round(time.Millisecond))

	// 2. The edit points at B (OTLP/gRPC): the same process switches.
	t0 := time.Now()
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge", fmt.Sprintf(
		`-p={"data":{"clovisor_exporter_endpoint":"http://%s","clovisor_exporter_protocol":"grpc"}}`, jb.OTLPGRPCEndpoint()))
	switched := fmt.Sprintf(`msg="exporter endpoint changed" component=kubernetes endpoint=http://%s protocol=grpc`, jb.OTLPGRPCEndpoint())
	waitUntil(t, a, "the exporter switched to B", 10*time.Second, func() bool { return strings.Contains(a.stderr.String(), switched) })
	t.Logf("switch logged %v after the edit", time.Since(t0).Round(time.Millisecond))
	get("b.html")
	t.Logf("b.html in B after %v", waitIn(jb, "B", "/b.html").Round(time.Millisecond))
	t.Logf("edit to spans in B: %v", time.Since(t0).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond) // more than a batch delay: a copy sent to A would be there
	absent(ja, "A", "/b.html")
	absent(jb, "B", "/a.html")
	if s, c := exchangeSpans(t, ja, "/a.html"); len(s) != 1 || len(c) != 1 {
		t.Errorf("Jaeger A holds %d server and %d client spans for /a.html after the switch, want 1 and 1", len(s), len(c))
	}

	// 3. An invalid endpoint is rejected; B keeps receiving.
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge",
		`-p={"data":{"clovisor_exporter_endpoint":"ht!tp://"}}`)
	waitUntil(t, a, "the invalid endpoint rejected in the log", 10*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), `msg="invalid ConfigMap rejected; keeping the last good configuration"`) &&
			strings.Contains(a.stderr.String(), `clovisor_exporter_endpoint: \"ht!tp://\": want a URL`)
	})
	waitUntil(t, a, "an InvalidConfiguration event naming the endpoint", 10*time.Second, func() bool {
		return strings.Contains(k.Kubectl(t, "get", "events", "-n", "clovisor", "--field-selector=reason=InvalidConfiguration",
			"-o=jsonpath={.items[*].message}"), `clovisor_exporter_endpoint: "ht!tp://": want a URL`)
	})
	get("c.html")
	waitIn(jb, "B", "/c.html")
	time.Sleep(500 * time.Millisecond)
	absent(ja, "A", "/c.html")
	if s, c := exchangeSpans(t, jb, "/b.html"); len(s) != 1 || len(c) != 1 {
		t.Errorf("Jaeger B holds %d server and %d client spans for /b.html, want 1 and 1", len(s), len(c))
	}

	// 4. Without the exporter keys (and no flag or variable naming a
	// collector) the current exporter stays: B, not A (the value the
	// ConfigMap had when the agent started).
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=json",
		`-p=[{"op":"remove","path":"/data/clovisor_exporter_endpoint"},{"op":"remove","path":"/data/clovisor_exporter_protocol"}]`)
	waitUntil(t, a, "the ConfigMap without exporter keys applied", 10*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), `msg="configuration applied" component=kubernetes resource_version=`) &&
			strings.Count(a.stderr.String(), `msg="configuration applied"`) == 2 // the edit to B, this one
	})
	get("d.html")
	waitIn(jb, "B", "/d.html")
	time.Sleep(500 * time.Millisecond)
	absent(ja, "A", "/d.html")

	// The same process did it all: no restart, one start, one switch.
	select {
	case err := <-a.done:
		t.Fatalf("agent exited: %v\n%s", err, a.stderr.String())
	default:
	}
	if a.cmd.Process.Pid != pid {
		t.Errorf("agent pid %d, was %d", a.cmd.Process.Pid, pid)
	}
	log := a.stderr.String()
	if n := strings.Count(log, "msg=tracing"); n != 1 {
		t.Errorf("agent started %d times (msg=tracing), want once", n)
	}
	if n := strings.Count(log, `msg="exporter endpoint changed"`); n != 1 {
		t.Errorf("%d exporter switches logged, want 1:\n%s", n, log)
	}
	a.stop(t)
	if strings.Contains(a.stderr.String(), "panic") || strings.Contains(a.stderr.String(), "flushing the previous exporter") {
		t.Errorf("agent log:\n%s", a.stderr.String())
	}
	t.Logf("total %v", time.Since(start).Round(time.Millisecond))
}
