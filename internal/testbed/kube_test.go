package testbed

import (
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// kubePod is the part of a Pod the tests read back.
type kubePod struct {
	Metadata struct {
		Name string `json:"name"`
		UID  string `json:"uid"`
	} `json:"metadata"`
	Spec struct {
		NodeName string `json:"nodeName"`
	} `json:"spec"`
	Status struct {
		Phase  string `json:"phase"`
		PodIP  string `json:"podIP"`
		PodIPs []struct {
			IP string `json:"ip"`
		} `json:"podIPs"`
		Conditions []struct {
			Type   string `json:"type"`
			Status string `json:"status"`
		} `json:"conditions"`
		ContainerStatuses []struct {
			Name        string `json:"name"`
			ContainerID string `json:"containerID"`
			Ready       bool   `json:"ready"`
			State       struct {
				Running *struct {
					StartedAt string `json:"startedAt"`
				} `json:"running"`
			} `json:"state"`
		} `json:"containerStatuses"`
	} `json:"status"`
}

// kubeStatus is a metav1.Status, the body of API errors.
type kubeStatus struct {
	Kind    string `json:"kind"`
	Status  string `json:"status"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Details struct {
		Kind string `json:"kind"`
	} `json:"details"`
	Code int `json:"code"`
}

func getPod(t *testing.T, k *Kube, ns, name string) kubePod {
	t.Helper()
	var p kubePod
	if err := json.Unmarshal([]byte(k.Kubectl(t, "get", "pod", "-n", ns, name, "-o", "json")), &p); err != nil {
		t.Fatalf("decoding pod %s/%s: %v", ns, name, err)
	}
	return p
}

// checkRunning asserts the status SetPodRunning wrote.
func checkRunning(t *testing.T, p kubePod, podIP, containerID string) {
	t.Helper()
	st := p.Status
	if st.Phase != "Running" || st.PodIP != podIP || len(st.PodIPs) != 1 || st.PodIPs[0].IP != podIP {
		t.Fatalf("pod %s status: phase %q podIP %q podIPs %v; want Running, %s, [%s]", p.Metadata.Name, st.Phase, st.PodIP, st.PodIPs, podIP, podIP)
	}
	if len(st.ContainerStatuses) != 1 {
		t.Fatalf("pod %s: %d container statuses, want 1: %+v", p.Metadata.Name, len(st.ContainerStatuses), st.ContainerStatuses)
	}
	cs := st.ContainerStatuses[0]
	if cs.Name != "web" || cs.ContainerID != containerID || !cs.Ready || cs.State.Running == nil || cs.State.Running.StartedAt == "" {
		t.Fatalf("pod %s container status %+v; want web, %s, ready, running", p.Metadata.Name, cs, containerID)
	}
	ready := false
	for _, c := range st.Conditions {
		if c.Type == "Ready" && c.Status == "True" {
			ready = true
		}
	}
	if !ready {
		t.Fatalf("pod %s conditions %+v: no Ready=True", p.Metadata.Name, st.Conditions)
	}
}

const webManifest = `apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels:
    app: web
spec:
  nodeName: testbed-node
  containers:
  - name: web
    image: nginx:1.27
    ports:
    - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 80
`

func TestKubePodServiceStatusAndRestart(t *testing.T) {
	start := time.Now()
	k := StartKube(t, KubeOptions{})
	t.Logf("StartKube (etcd + kube-apiserver ready): %v; server %s, etcd %s", time.Since(start).Round(time.Millisecond), k.Server(), k.EtcdURL())

	var ver struct {
		ServerVersion struct {
			GitVersion string `json:"gitVersion"`
		} `json:"serverVersion"`
	}
	if err := json.Unmarshal([]byte(k.Kubectl(t, "version", "-o", "json")), &ver); err != nil {
		t.Fatalf("kubectl version: %v", err)
	}
	if ver.ServerVersion.GitVersion != KubeVersion {
		t.Fatalf("server version %q, want %q", ver.ServerVersion.GitVersion, KubeVersion)
	}

	k.Apply(t, webManifest)
	p := getPod(t, k, "shop", "web-0")
	if p.Status.Phase != "Pending" || p.Status.PodIP != "" || p.Spec.NodeName != "testbed-node" {
		t.Fatalf("new pod: phase %q podIP %q node %q; want Pending, none, testbed-node (no kubelet)", p.Status.Phase, p.Status.PodIP, p.Spec.NodeName)
	}
	clusterIP := strings.TrimSpace(k.Kubectl(t, "get", "service", "-n", "shop", "web", "-o", "jsonpath={.spec.clusterIP}"))
	if ip, err := netip.ParseAddr(clusterIP); err != nil || !netip.MustParsePrefix(KubeServiceCIDR).Contains(ip) {
		t.Fatalf("service cluster IP %q (%v), want one in %s", clusterIP, err, KubeServiceCIDR)
	}

	const podIP = "10.201.7.10"
	containerID := "containerd://" + strings.Repeat("0123456789abcdef", 4)
	k.SetPodRunning(t, "shop", "web-0", podIP, containerID)
	running := getPod(t, k, "shop", "web-0")
	checkRunning(t, running, podIP, containerID)
	if running.Metadata.UID != p.Metadata.UID {
		t.Fatalf("pod UID changed from %s to %s", p.Metadata.UID, running.Metadata.UID)
	}

	// What a DaemonSet's agent lists: its node's pods, by field selector, over REST.
	code, body := k.Do(t, KubeAdmin, http.MethodGet, "/api/v1/pods?fieldSelector=spec.nodeName%3Dtestbed-node", nil)
	var list struct {
		Items []kubePod `json:"items"`
	}
	if code != http.StatusOK || json.Unmarshal(body, &list) != nil || len(list.Items) != 1 {
		t.Fatalf("listing the node's pods: %d %s", code, body)
	}
	checkRunning(t, list.Items[0], podIP, containerID)

	// The API server goes away and comes back; etcd keeps the state.
	k.StopAPIServer(t)
	if k.Running() {
		t.Fatal("Running() after StopAPIServer")
	}
	if _, _, err := k.do(KubeAdmin, http.MethodGet, "/readyz", nil); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("request while stopped: %v; want connection refused", err)
	}
	restart := time.Now()
	k.StartAPIServer(t)
	t.Logf("StartAPIServer (restart to ready): %v", time.Since(restart).Round(time.Millisecond))
	after := getPod(t, k, "shop", "web-0")
	checkRunning(t, after, podIP, containerID)
	if after.Metadata.UID != p.Metadata.UID {
		t.Fatalf("pod UID after restart %s, want %s", after.Metadata.UID, p.Metadata.UID)
	}
	if got := strings.TrimSpace(k.Kubectl(t, "get", "service", "-n", "shop", "web", "-o", "jsonpath={.spec.clusterIP}")); got != clusterIP {
		t.Fatalf("service cluster IP after restart %q, want %q", got, clusterIP)
	}
	// And it takes writes again.
	k.Kubectl(t, "label", "pod", "-n", "shop", "web-0", "restarted=yes")
}

const rbacManifest = `apiVersion: v1
kind: Namespace
metadata:
  name: team-a
---
apiVersion: v1
kind: Namespace
metadata:
  name: team-b
---
apiVersion: v1
kind: Pod
metadata:
  name: app
  namespace: team-a
spec:
  containers:
  - name: app
    image: busybox:1.36
---
apiVersion: v1
kind: Secret
metadata:
  name: hidden
  namespace: team-a
stringData:
  password: s3cret
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: pod-reader
  namespace: team-a
rules:
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: viewer-reads-pods
  namespace: team-a
subjects:
- kind: User
  name: viewer
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: pod-reader
  apiGroup: rbac.authorization.k8s.io
---
apiVersion: v1
kind: Namespace
metadata:
  name: clovisor
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: clovisor
  namespace: clovisor
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: clovisor
rules:
- apiGroups: [""]
  resources: ["pods", "nodes"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: clovisor
subjects:
- kind: ServiceAccount
  name: clovisor
  namespace: clovisor
roleRef:
  kind: ClusterRole
  name: clovisor
  apiGroup: rbac.authorization.k8s.io
`

// forbidden asserts that code and body are the API server's 403 for user
// listing resource in namespace ns ("" for all namespaces).
func forbidden(t *testing.T, code int, body []byte, user, resource, ns string) {
	t.Helper()
	want := `User "` + user + `" cannot list resource "` + resource + `" in API group "" `
	if ns == "" {
		want += "at the cluster scope"
	} else {
		want += `in the namespace "` + ns + `"`
	}
	want = resource + " is forbidden: " + want
	var st kubeStatus
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("decoding %d answer %q: %v", code, body, err)
	}
	if code != http.StatusForbidden || st.Kind != "Status" || st.Status != "Failure" || st.Reason != "Forbidden" ||
		st.Code != 403 || st.Details.Kind != resource || st.Message != want {
		t.Fatalf("got %d %+v\nwant 403 Status Failure Forbidden, details.kind %q, message %q", code, st, resource, want)
	}
}

func TestKubeRBAC(t *testing.T) {
	start := time.Now()
	k := StartKube(t, KubeOptions{RBAC: true, Users: []KubeUser{{Name: "viewer", Groups: []string{"team-a-devs"}}}})
	t.Logf("StartKube (RBAC) ready in %v", time.Since(start).Round(time.Millisecond))
	k.Apply(t, rbacManifest)

	// The authorizer reads bindings from a cache: give it a moment.
	deadline := time.Now().Add(10 * time.Second)
	var out, stderr string
	var err error
	for {
		out, stderr, err = k.RunKubectl("viewer", "", "get", "pods", "-n", "team-a", "-o", "name")
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil || strings.TrimSpace(out) != "pod/app" {
		t.Fatalf("viewer listing pods in team-a: %q, %v\n%s", out, err, stderr)
	}

	code, body := k.Do(t, "viewer", http.MethodGet, "/api/v1/namespaces/team-a/secrets", nil)
	forbidden(t, code, body, "viewer", "secrets", "team-a")
	code, body = k.Do(t, "viewer", http.MethodGet, "/api/v1/namespaces/team-b/pods", nil)
	forbidden(t, code, body, "viewer", "pods", "team-b")
	_, stderr, err = k.RunKubectl("viewer", "", "get", "secrets", "-n", "team-a")
	wantErr := `Error from server (Forbidden): secrets is forbidden: User "viewer" cannot list resource "secrets" in API group "" in the namespace "team-a"`
	if err == nil || strings.TrimSpace(stderr) != wantErr {
		t.Fatalf("kubectl get secrets as viewer: err %v, stderr %q; want %q", err, stderr, wantErr)
	}
	// The admin (system:masters) may.
	if code, body := k.Do(t, KubeAdmin, http.MethodGet, "/api/v1/namespaces/team-a/secrets", nil); code != http.StatusOK {
		t.Fatalf("admin listing secrets: %d %s", code, body)
	}

	// A ServiceAccount bound to a ClusterRole, as Clovisor's DaemonSet would
	// run: a token from the TokenRequest API, pods everywhere, no secrets.
	token := strings.TrimSpace(k.Kubectl(t, "create", "token", "clovisor", "-n", "clovisor", "--duration=1h"))
	kc := k.WriteKubeconfig(t, "clovisor", token)
	out, stderr, err = runKubectl(kc, t.TempDir(), "", "get", "pods", "-A", "-o", "name")
	if err != nil || strings.TrimSpace(out) != "pod/app" {
		t.Fatalf("service account listing all pods: %q, %v\n%s", out, err, stderr)
	}
	req, _ := http.NewRequest(http.MethodGet, k.Server()+"/api/v1/secrets", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := k.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	forbidden(t, resp.StatusCode, body, "system:serviceaccount:clovisor:clovisor", "secrets", "")
}

func TestStartKubeReportsEarlyExit(t *testing.T) {
	RequireTool(t, "etcd")
	fake := filepath.Join(t.TempDir(), "kube-apiserver")
	script := "#!/bin/sh\necho 'fake kube-apiserver: bad flag' >&2\nexit 3\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := startKube(t, KubeOptions{}, fake)
	if err == nil || !strings.Contains(err.Error(), "kube-apiserver exited before becoming ready") ||
		!strings.Contains(err.Error(), "fake kube-apiserver: bad flag") {
		t.Fatalf("startKube with a failing binary: %v; want early exit with the log tail", err)
	}
}

func TestStartKubeRejectsBadUsers(t *testing.T) {
	for _, users := range [][]KubeUser{
		{{Name: "admin"}},
		{{Name: "a,b"}},
		{{Name: "x"}, {Name: "x"}},
		{{Name: "x", Groups: []string{"g,h"}}},
	} {
		if _, err := startKube(t, KubeOptions{Users: users}, "/nonexistent"); err == nil {
			t.Errorf("startKube with users %+v: no error", users)
		}
	}
}
