package testbed

// A simulated Kubernetes node for a Kube: the harness plays the kubelet
// and the container runtime for the pods created through the API server.

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CgroupDriver is the kubelet's cgroup driver, which decides the layout of
// the kubepods hierarchy.
type CgroupDriver int

const (
	// CgroupfsDriver: kubepods/<qos>/pod<uid>/<container-id>.
	CgroupfsDriver CgroupDriver = iota + 1
	// SystemdDriver: kubepods.slice/kubepods-<qos>.slice/
	// kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope.
	SystemdDriver
)

func (d CgroupDriver) String() string {
	if d == SystemdDriver {
		return "systemd"
	}
	return "cgroupfs"
}

// KubeNode is a simulated node of a Kube: a Node (network namespace with
// routed pod veths) and a kubepods cgroup hierarchy below
// <cgroup2>/clovisor-test/kubenode-<random>/ in the layout of its cgroup
// driver. RunPod does the kubelet's part for a pod bound to it.
type KubeNode struct {
	Kube   *Kube
	Name   string
	Net    *Node
	Driver CgroupDriver
	mount  string
	base   string // below the mount: /clovisor-test/kubenode-<random>
	made   map[string]bool
}

// NewKubeNode makes a simulated node named name (the pods' spec.nodeName).
// Everything is removed when the test ends.
func NewKubeNode(t testing.TB, k *Kube, name string, driver CgroupDriver) *KubeNode {
	t.Helper()
	RequireRoot(t)
	mount, err := Cgroup2Mount()
	if err != nil {
		skipOrFail(t, "NewKubeNode: %v", err)
		return nil
	}
	n := &KubeNode{Kube: k, Name: name, Net: NewNode(t, Routed), Driver: driver, mount: mount,
		base: "/" + CgroupParent + "/kubenode-" + randSuffix(8), made: map[string]bool{}}
	n.mkdir(t, "/"+CgroupParent)
	n.mkdir(t, n.base)
	n.mkdir(t, n.CgroupRoot())
	return n
}

// mkdir makes a cgroup directory (below the mount) and removes it when
// the test ends (after what is made inside it later).
func (n *KubeNode) mkdir(t testing.TB, rel string) {
	t.Helper()
	if n.made[rel] {
		return
	}
	dir := filepath.Join(n.mount, rel)
	err := os.Mkdir(dir, 0o755)
	if errors.Is(err, os.ErrExist) && rel == "/"+CgroupParent {
		n.made[rel] = true
		return // shared with other tests: removed by whoever empties it
	}
	if err != nil {
		t.Fatalf("KubeNode: %v", err)
	}
	n.made[rel] = true
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("KubeNode cleanup: %v", err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// CgroupRoot returns the node's kubepods directory below the cgroup2
// mount (kubepods or kubepods.slice), for the agent's --kube-cgroup-root.
func (n *KubeNode) CgroupRoot() string {
	if n.Driver == SystemdDriver {
		return n.base + "/kubepods.slice"
	}
	return n.base + "/kubepods"
}

// KubePod is a pod the harness runs: its network namespace and veth, and
// one cgroup (with a process) per container.
type KubePod struct {
	Namespace, Name, UID string
	Net                  *Pod
	// Containers maps container names to their cgroups, ContainerIDs to
	// their bare IDs.
	Containers   map[string]*Cgroup
	ContainerIDs map[string]string
	// RunningAt is when the harness started writing the Running status.
	RunningAt time.Time
	node      *KubeNode
	stopped   bool
}

// PodProcess says what runs in a container: nginx on Port serving Root,
// or (Port 0) a process that only sleeps, or with None nothing at all (a
// cgroup without processes: many pods cheaply).
type PodProcess struct {
	Port uint16
	Root string
	None bool
}

// RunPod plays the kubelet for the pod namespace/name, already created
// through the API with spec.nodeName = n.Name: it makes the pod's network
// namespace with a veth into the node, a cgroup per container in the
// kubepods hierarchy (QoS besteffort) with procs[container] running in it
// (in the pod's namespace), and writes the status through the API: Running,
// the pod's IP, "containerd://<id>" per container.
func (n *KubeNode) RunPod(t testing.TB, namespace, name string, procs map[string]PodProcess) *KubePod {
	t.Helper()
	var pod struct {
		Metadata struct {
			UID string `json:"uid"`
		} `json:"metadata"`
		Spec struct {
			NodeName   string         `json:"nodeName"`
			Containers []podContainer `json:"containers"`
		} `json:"spec"`
	}
	path := "/api/v1/namespaces/" + namespace + "/pods/" + name
	code, b := n.Kube.Do(t, KubeAdmin, http.MethodGet, path, nil)
	if code != http.StatusOK {
		t.Fatalf("RunPod: GET %s: %d %s", path, code, b)
	}
	if err := json.Unmarshal(b, &pod); err != nil {
		t.Fatal(err)
	}
	if pod.Spec.NodeName != n.Name {
		t.Fatalf("RunPod %s/%s: spec.nodeName %q, not this node %q", namespace, name, pod.Spec.NodeName, n.Name)
	}
	kp := &KubePod{Namespace: namespace, Name: name, UID: pod.Metadata.UID, Containers: map[string]*Cgroup{},
		ContainerIDs: map[string]string{}, node: n}
	kp.Net = n.Net.AddPod(t, name)
	podDir := n.podCgroup(t, kp.UID)
	ids := map[string]string{}
	for _, c := range pod.Spec.Containers {
		id := randSuffix(64)
		rel := podDir + "/" + id
		if n.Driver == SystemdDriver {
			rel = podDir + "/cri-containerd-" + id + ".scope"
		}
		cg := &Cgroup{mount: n.mount, rel: rel}
		if err := os.Mkdir(cg.Dir(), 0o755); err != nil {
			t.Fatalf("RunPod: %v", err)
		}
		t.Cleanup(func() {
			if err := cg.remove(); err != nil {
				t.Errorf("RunPod cleanup: %v", err)
			}
		})
		var st syscall.Stat_t
		if err := syscall.Stat(cg.Dir(), &st); err != nil {
			t.Fatal(err)
		}
		cg.id = st.Ino
		kp.Containers[c.Name] = cg
		kp.ContainerIDs[c.Name] = id
		ids[c.Name] = "containerd://" + id
		p := procs[c.Name]
		if p.None {
			continue
		}
		if p.Port != 0 {
			startNginx(t, nginxConfig{ns: kp.Net.NS, cgroup: cg, port: p.Port, root: p.Root, addrs: []netip.Addr{kp.Net.IP}})
		} else {
			startServer(t, kp.Net.NS, cg, t.TempDir(), "sleep", "infinity")
		}
	}
	kp.RunningAt = time.Now()
	n.Kube.SetPodStatus(t, namespace, name, PodRunning{PodIP: kp.Net.IP.String(), HostIP: n.Net.NodeIP.String(), ContainerIDs: ids})
	return kp
}

// podCgroup makes the pod's cgroup directory (QoS besteffort) and returns
// it below the mount.
func (n *KubeNode) podCgroup(t testing.TB, uid string) string {
	t.Helper()
	var qos, pod string
	if n.Driver == SystemdDriver {
		qos = n.CgroupRoot() + "/kubepods-besteffort.slice"
		pod = qos + "/kubepods-besteffort-pod" + strings.ReplaceAll(uid, "-", "_") + ".slice"
	} else {
		qos = n.CgroupRoot() + "/besteffort"
		pod = qos + "/pod" + uid
	}
	n.mkdir(t, qos)
	n.mkdir(t, pod)
	return pod
}

// Exec runs a program inside the pod: in its network namespace and in the
// cgroup of its container, waits for it and returns its standard output.
func (p *KubePod) Exec(t testing.TB, container string, name string, args ...string) string {
	t.Helper()
	cg := p.Containers[container]
	if cg == nil {
		t.Fatalf("pod %s has no container %q", p.Name, container)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := p.Net.NS.Command(ctx, name, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cg.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s %s in pod %s: %v\n%s%s", name, strings.Join(args, " "), p.Name, err, out.String(), errb.String())
	}
	return out.String()
}

// Delete deletes the pod through the API (at once: no kubelet confirms a
// graceful deletion) and then, like a kubelet, removes its processes,
// cgroups and network namespace (and with it the veth).
func (p *KubePod) Delete(t testing.TB) {
	t.Helper()
	p.node.Kube.Kubectl(t, "delete", "pod", "-n", p.Namespace, p.Name, "--grace-period=0", "--force", "--wait=true")
	p.Stop(t)
}

// Stop removes the pod's processes, cgroups and network namespace without
// telling the API server.
func (p *KubePod) Stop(t testing.TB) {
	t.Helper()
	if p.stopped {
		return
	}
	p.stopped = true
	for _, cg := range p.Containers {
		if err := cg.remove(); err != nil {
			t.Errorf("stopping pod %s: %v", p.Name, err)
		}
	}
	if err := p.Net.NS.remove(); err != nil {
		t.Errorf("stopping pod %s: %v", p.Name, err)
	}
}
