package main

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// kubeBench starts a Kube, a simulated node and the agent (json output)
// for the benchmarks.
func kubeBench(b *testing.B, wire bool) (*testbed.Kube, *testbed.KubeNode, *agent) {
	b.Helper()
	testbed.RequireRoot(b)
	k := testbed.StartKube(b, testbed.KubeOptions{APIServerFlags: []string{"--shutdown-watch-termination-grace-period=1s"}})
	n := testbed.NewKubeNode(b, k, "bench-node", testbed.CgroupfsDriver)
	k.Apply(b, "apiVersion: v1\nkind: Namespace\nmetadata: {name: clovisor}\n")
	conf := filepath.Join(b.TempDir(), "clovisor.yaml")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("wire:\n  netns: %s\n  nodeInterfaces: []\n", n.Net.NS.Path())), 0o644); err != nil {
		b.Fatal(err)
	}
	a := startAgent(b, []string{"KUBECONFIG=", "NODE_NAME=", "OTEL_EXPORTER_OTLP_ENDPOINT=", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="},
		fmt.Sprintf("--wire=%v", wire), "--kubeconfig="+k.Kubeconfig(), "--node-name=bench-node", "--namespace=clovisor",
		"--kube-cgroup-root="+n.CgroupRoot(), "--config="+conf, "--output=json", "--stats-interval=0")
	return k, n, a
}

func podManifest(name, node string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: default, labels: {app: %s}}
spec:
  nodeName: %s
  containers: [{name: main, image: nginx}]
`, name, name, node)
}

// BenchmarkPodRunningToFirstSpan: from the pod's status turning Running
// (written through the API, with nginx already running in its cgroup) to
// the agent printing the first socket span of a request to it, with a client
// pod sending requests (curl through `ip netns exec`, one after the other)
// from then on. Metrics: ms/traced, until the agent's log says the pod's
// container and veth are traced; ms/first-span, until the span is printed;
// first-traced-request, which request (1: the first sent after the status
// write) gave the first socket span; ms/curl, one request's run time.
func BenchmarkPodRunningToFirstSpan(b *testing.B) {
	k, n, a := kubeBench(b, true)
	root := b.TempDir()
	if err := os.WriteFile(filepath.Join(root, "x"), []byte("x"), 0o644); err != nil {
		b.Fatal(err)
	}
	k.Apply(b, podManifest("client", n.Name))
	client := n.RunPod(b, "default", "client", nil)
	var total, ready, curl time.Duration
	curls, tries := 0, 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		name := "srv-" + strconv.Itoa(i)
		k.Apply(b, podManifest(name, n.Name))
		pod := n.RunPod(b, "default", name, map[string]testbed.PodProcess{"main": {Port: 8080, Root: root}})
		want := fmt.Sprintf(`"k8s.pod.name":"%s"`, name)
		for try := 1; ; try++ {
			url := fmt.Sprintf("http://%s/x?try=%d", netip.AddrPortFrom(pod.Net.IP, 8080), try)
			t0 := time.Now()
			client.Exec(b, "main", "curl", "-s", "-o", "/dev/null", url)
			curl += time.Since(t0)
			curls++
			if socketSpanOf(a.stdout.String(), want) {
				break
			}
			if time.Since(pod.RunningAt) > 20*time.Second {
				b.Fatalf("no span of %s after 20 s:\n%s", name, a.stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		total += time.Since(pod.RunningAt)
		// Which request was the first traced (1: the first one sent after
		// the status write)?
		firstTry := 0
		for _, l := range strings.Split(a.stdout.String(), "\n") {
			if strings.Contains(l, want) && strings.Contains(l, `"clovisor.point":"socket"`) {
				if _, q, ok := strings.Cut(l, `"url.query":"try=`); ok {
					n, _ := strconv.Atoi(q[:strings.IndexByte(q, '"')])
					if firstTry == 0 || n < firstTry {
						firstTry = n
					}
				}
			}
		}
		tries += firstTry
		// When the agent had the pod's container and veth traced, by its log.
		var last time.Time
		for _, l := range strings.Split(a.stderr.String(), "\n") {
			if strings.Contains(l, "pod=default/"+name+" ") && (strings.Contains(l, `msg="tracing container"`) || strings.Contains(l, `msg="tracing pod veth"`)) {
				ts, _, _ := strings.Cut(strings.TrimPrefix(l, "time="), " ")
				if at, err := time.Parse(time.RFC3339Nano, ts); err == nil && at.After(last) {
					last = at
				}
			}
		}
		ready += last.Sub(pod.RunningAt)
		pod.Delete(b)
	}
	b.StopTimer()
	b.ReportMetric(float64(ready.Microseconds())/1000/float64(b.N), "ms/traced")
	b.ReportMetric(float64(curl.Microseconds())/1000/float64(curls), "ms/curl")
	b.ReportMetric(float64(curls)/float64(b.N), "curls/op")
	b.ReportMetric(float64(tries)/float64(b.N), "first-traced-request")
	b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/first-span")
}

// BenchmarkAgentMemory100Pods: the agent's resident memory (VmRSS) and Go
// heap-independent figure with no pods, then with 100 selected pods Running
// on its node (each with a network namespace, a routed veth the agent
// attaches to, and a container cgroup it traces; no processes).
func BenchmarkAgentMemory100Pods(b *testing.B) {
	for i := 0; i < b.N; i++ {
		k, n, a := kubeBench(b, true)
		time.Sleep(time.Second)
		before := vmRSS(b, a.cmd.Process.Pid)
		const pods = 100
		var sb strings.Builder
		for j := 0; j < pods; j++ {
			sb.WriteString(podManifest(fmt.Sprintf("p%03d", j), n.Name))
			sb.WriteString("---\n")
		}
		k.Apply(b, sb.String())
		for j := 0; j < pods; j++ {
			n.RunPod(b, "default", fmt.Sprintf("p%03d", j), map[string]testbed.PodProcess{"main": {None: true}})
		}
		deadline := time.Now().Add(60 * time.Second)
		for strings.Count(a.stderr.String(), `msg="tracing pod veth"`) < pods || strings.Count(a.stderr.String(), `msg="tracing container"`) < pods {
			if time.Now().After(deadline) {
				b.Fatalf("not all %d pods traced:\n%s", pods, a.stderr.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(2 * time.Second)
		after := vmRSS(b, a.cmd.Process.Pid)
		b.ReportMetric(before, "MiB-rss-0-pods")
		b.ReportMetric(after, "MiB-rss-100-pods")
		a.stop(b)
	}
}

// vmRSS reads a process's resident set size in MiB.
func vmRSS(b *testing.B, pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				b.Fatal(err)
			}
			return float64(kb) / 1024
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// socketSpanOf reports whether out holds a socket span line containing want.
func socketSpanOf(out, want string) bool {
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, want) && strings.Contains(l, `"clovisor.point":"socket"`) {
			return true
		}
	}
	return false
}
