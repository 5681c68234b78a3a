package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestDeployManifestRBAC applies deploy/clovisor.yaml to a real API server
// in RBAC mode and checks that the agent's ServiceAccount may do what the
// agent needs, and nothing more; then runs the agent with that account's
// token: it syncs, applies a ConfigMap edit and reports an invalid one as
// an Event.
func TestDeployManifestRBAC(t *testing.T) {
	testbed.RequireTool(t, "kubectl")
	manifest, err := os.ReadFile("../../deploy/clovisor.yaml")
	if err != nil {
		t.Fatal(err)
	}
	k := testbed.StartKube(t, testbed.KubeOptions{RBAC: true, APIServerFlags: []string{"--shutdown-watch-termination-grace-period=1s"}})
	k.Apply(t, string(manifest))
	for _, obj := range []string{"daemonset/clovisor", "serviceaccount/clovisor", "configmap/clovisor", "role/clovisor", "rolebinding/clovisor"} {
		k.Kubectl(t, "get", "-n", "clovisor", obj)
	}
	token := strings.TrimSpace(k.Kubectl(t, "create", "token", "clovisor", "-n", "clovisor", "--duration=1h"))
	kc := k.WriteKubeconfig(t, "clovisor", token)
	kubectl := func(args ...string) (string, error) {
		cmd := exec.Command("kubectl", append([]string{"--kubeconfig=" + kc, "--cache-dir=" + t.TempDir()}, args...)...)
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	canI := func(args ...string) string {
		cmd := exec.Command("kubectl", append([]string{"--kubeconfig=" + kc, "--cache-dir=" + t.TempDir(), "auth", "can-i"}, args...)...)
		out, _ := cmd.Output() // "no" exits 1
		return strings.TrimSpace(string(out))
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"list", "pods", "--all-namespaces"}, "yes"},
		{[]string{"watch", "pods", "--all-namespaces"}, "yes"},
		{[]string{"list", "services", "--all-namespaces"}, "yes"},
		{[]string{"watch", "endpointslices.discovery.k8s.io", "--all-namespaces"}, "yes"},
		{[]string{"get", "configmap/clovisor", "-n", "clovisor"}, "yes"},
		{[]string{"watch", "configmap/clovisor", "-n", "clovisor"}, "yes"},
		{[]string{"create", "events", "-n", "clovisor"}, "yes"},
		{[]string{"get", "secrets", "--all-namespaces"}, "no"},
		{[]string{"get", "secrets", "-n", "clovisor"}, "no"},
		{[]string{"list", "configmaps", "-n", "clovisor"}, "no"},
		{[]string{"get", "configmap/other", "-n", "clovisor"}, "no"},
		{[]string{"get", "configmaps", "-n", "kube-system"}, "no"},
		{[]string{"update", "configmap/clovisor", "-n", "clovisor"}, "no"},
		{[]string{"create", "pods/exec", "-n", "default"}, "no"},
		{[]string{"create", "pods", "-n", "default"}, "no"},
		{[]string{"delete", "pods", "-n", "default"}, "no"},
		{[]string{"patch", "pods/status", "-n", "default"}, "no"},
		{[]string{"list", "nodes"}, "no"},
		{[]string{"create", "events", "-n", "default"}, "no"},
	} {
		if got := canI(c.args...); got != c.want {
			t.Errorf("can-i %s: %q, want %q", strings.Join(c.args, " "), got, c.want)
		}
	}
	if out, err := kubectl("get", "secrets", "-A"); err == nil || !strings.Contains(out, "Forbidden") {
		t.Errorf("listing secrets with the agent's token: %v %s", err, out)
	}
	k.Apply(t, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: clovisor}\ndata: {x: \"y\"}\n")
	if out, err := kubectl("get", "configmap", "-n", "clovisor", "other"); err == nil || !strings.Contains(out, "Forbidden") {
		t.Errorf("reading another ConfigMap with the agent's token: %v %s", err, out)
	}

	// The agent itself, with the ServiceAccount's token.
	testbed.RequireRoot(t)
	a := startAgent(t, []string{"KUBECONFIG=", "NODE_NAME=", "POD_NAMESPACE="}, "--kubeconfig="+kc, "--node-name=node-rbac",
		"--namespace=clovisor", "--output=json", "--kube-sync-timeout=20s")
	if log := a.stderr.String(); !strings.Contains(log, `msg="kubernetes mode"`) || strings.Contains(log, "not synced") {
		t.Fatalf("agent did not sync with the ServiceAccount's token:\n%s", log)
	}
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge", `-p={"data":{"clovisor_labels":"default,shop"}}`)
	waitUntil(t, a, "the edit applied", 10*time.Second, func() bool {
		return strings.Contains(a.stderr.String(), `msg="configuration applied"`) && strings.Contains(a.stderr.String(), "labels=default,shop")
	})
	k.Kubectl(t, "patch", "configmap", "-n", "clovisor", "clovisor", "--type=merge", `-p={"data":{"clovisor_egress_match":"nonsense"}}`)
	waitUntil(t, a, "an InvalidConfiguration event recorded by the agent", 10*time.Second, func() bool {
		return strings.Contains(k.Kubectl(t, "get", "events", "-n", "clovisor", "--field-selector=reason=InvalidConfiguration",
			"-o=jsonpath={.items[*].message}"), "clovisor_egress_match")
	})
	a.stop(t)
	for _, bad := range []string{"forbidden", "Forbidden", "list/watch failed", "recording an event"} {
		if strings.Contains(a.stderr.String(), bad) {
			t.Errorf("agent log holds %q:\n%s", bad, a.stderr.String())
		}
	}
}
