package podmap

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// Defaults of the Kubernetes mode.
const (
	// DefaultNamespace is the agent's namespace when POD_NAMESPACE and
	// the service account's namespace file say nothing.
	DefaultNamespace = "clovisor"
	// DefaultConfigMap is the name of the agent's ConfigMap.
	DefaultConfigMap = "clovisor"
)

const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// ErrNotKubernetes says there are no credentials for a cluster: the agent
// runs as the plain-host tracer.
var ErrNotKubernetes = errors.New("no in-cluster credentials and no kubeconfig")

// RestConfig finds the cluster's credentials: the kubeconfig named by flag,
// else by $KUBECONFIG, else the in-cluster service account. source says
// which. ErrNotKubernetes when there are none.
func RestConfig(kubeconfig string) (cfg *rest.Config, source string, err error) {
	switch {
	case kubeconfig != "":
		source = "--kubeconfig " + kubeconfig
	case os.Getenv("KUBECONFIG") != "":
		kubeconfig = os.Getenv("KUBECONFIG")
		source = "KUBECONFIG " + kubeconfig
	}
	if kubeconfig != "" {
		rules := &clientcmd.ClientConfigLoadingRules{Precedence: strings.Split(kubeconfig, string(os.PathListSeparator))}
		cfg, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
		if err != nil {
			return nil, source, fmt.Errorf("kubeconfig (%s): %w", source, err)
		}
		return cfg, source, nil
	}
	if os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		return nil, "", ErrNotKubernetes
	}
	cfg, err = rest.InClusterConfig()
	if err != nil {
		return nil, "in-cluster", fmt.Errorf("in-cluster credentials: %w", err)
	}
	return cfg, "in-cluster", nil
}

// NodeName returns the node's name: the flag, else $NODE_NAME (the
// DaemonSet sets it from spec.nodeName), else the host name.
func NodeName(flag string) (name, source string, err error) {
	if flag != "" {
		return flag, "--node-name", nil
	}
	if n := os.Getenv("NODE_NAME"); n != "" {
		return n, "NODE_NAME", nil
	}
	h, err := os.Hostname()
	if err != nil {
		return "", "", fmt.Errorf("node name: no --node-name, no NODE_NAME and no host name: %w", err)
	}
	return strings.ToLower(h), "hostname", nil
}

// AgentNamespace returns the agent's own namespace: the flag, else
// $POD_NAMESPACE, else the service account's namespace file, else
// DefaultNamespace.
func AgentNamespace(flag string) string {
	if flag != "" {
		return flag
	}
	if ns := os.Getenv("POD_NAMESPACE"); ns != "" {
		return ns
	}
	if b, err := os.ReadFile(serviceAccountDir + "/namespace"); err == nil && strings.TrimSpace(string(b)) != "" {
		return strings.TrimSpace(string(b))
	}
	return DefaultNamespace
}

// WatcherOptions configure a Watcher.
type WatcherOptions struct {
	Node string
	// Namespace and ConfigMap name the agent's ConfigMap.
	Namespace, ConfigMap string
	// Resync is the informers' resync period (0: none).
	Resync time.Duration
	Logger *slog.Logger
}

// Watcher keeps informers on the pods of one node, the cluster's Services
// and EndpointSlices, and the agent's own ConfigMap (the only one it may
// read: a field selector on its name, so that RBAC's resourceNames allow
// the list and watch). Changed is signalled after every change.
type Watcher struct {
	client kubernetes.Interface
	opts   WatcherOptions
	log    *slog.Logger

	podFactory, clusterFactory, cmFactory informers.SharedInformerFactory
	pods, services, slices, configMaps    cache.SharedIndexInformer

	changed chan struct{}

	mu        sync.Mutex
	lastError time.Time
}

// NewWatcher makes the informers (not started yet).
func NewWatcher(client kubernetes.Interface, opts WatcherOptions) *Watcher {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ConfigMap == "" {
		opts.ConfigMap = DefaultConfigMap
	}
	w := &Watcher{client: client, opts: opts, log: opts.Logger.With("component", "kubernetes"), changed: make(chan struct{}, 1)}
	node := opts.Node
	w.podFactory = informers.NewSharedInformerFactoryWithOptions(client, opts.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		}))
	w.clusterFactory = informers.NewSharedInformerFactory(client, opts.Resync)
	w.cmFactory = informers.NewSharedInformerFactoryWithOptions(client, opts.Resync,
		informers.WithNamespace(opts.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", opts.ConfigMap).String()
		}))
	w.pods = w.podFactory.Core().V1().Pods().Informer()
	w.services = w.clusterFactory.Core().V1().Services().Informer()
	w.slices = w.clusterFactory.Discovery().V1().EndpointSlices().Informer()
	w.configMaps = w.cmFactory.Core().V1().ConfigMaps().Informer()
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { w.signal() },
		UpdateFunc: func(any, any) { w.signal() },
		DeleteFunc: func(any) { w.signal() },
	}
	for name, inf := range map[string]cache.SharedIndexInformer{
		"pods": w.pods, "services": w.services, "endpointslices": w.slices, "configmaps": w.configMaps,
	} {
		_, _ = inf.AddEventHandler(h)
		name := name
		_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
			w.watchError(name, err)
		})
	}
	return w
}

// watchError logs a failed list or watch: the informers retry by
// themselves, with backoff.
func (w *Watcher) watchError(resource string, err error) {
	w.mu.Lock()
	w.lastError = time.Now()
	w.mu.Unlock()
	w.log.Warn("kubernetes API list/watch failed; retrying", "resource", resource, "error", err.Error())
}

func (w *Watcher) signal() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// Changed receives a value after changes (several changes may give one).
func (w *Watcher) Changed() <-chan struct{} { return w.changed }

// Start starts the informers; they stop when ctx is done.
func (w *Watcher) Start(ctx context.Context) {
	w.podFactory.Start(ctx.Done())
	w.clusterFactory.Start(ctx.Done())
	w.cmFactory.Start(ctx.Done())
}

// WaitForSync waits until every informer has listed once, or ctx is done.
func (w *Watcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.pods.HasSynced, w.services.HasSynced, w.slices.HasSynced, w.configMaps.HasSynced)
}

// Synced reports whether every informer has listed once.
func (w *Watcher) Synced() bool {
	return w.pods.HasSynced() && w.services.HasSynced() && w.slices.HasSynced() && w.configMaps.HasSynced()
}

// Snapshot returns what the informers hold now (shared objects: do not
// modify them).
func (w *Watcher) Snapshot() Snapshot {
	var s Snapshot
	for _, o := range w.pods.GetStore().List() {
		if p, ok := o.(*corev1.Pod); ok {
			s.Pods = append(s.Pods, p)
		}
	}
	for _, o := range w.services.GetStore().List() {
		if v, ok := o.(*corev1.Service); ok {
			s.Services = append(s.Services, v)
		}
	}
	for _, o := range w.slices.GetStore().List() {
		if v, ok := o.(*discoveryv1.EndpointSlice); ok {
			s.Slices = append(s.Slices, v)
		}
	}
	return s
}

// ConfigMap returns the agent's ConfigMap, nil when there is none.
func (w *Watcher) ConfigMap() *corev1.ConfigMap {
	for _, o := range w.configMaps.GetStore().List() {
		if cm, ok := o.(*corev1.ConfigMap); ok && cm.Name == w.opts.ConfigMap {
			return cm
		}
	}
	return nil
}

// PodsSelected lists the pods matching a label selector (tests, tools).
func (w *Watcher) PodsSelected(sel labels.Selector) []*corev1.Pod {
	var out []*corev1.Pod
	for _, o := range w.pods.GetStore().List() {
		if p, ok := o.(*corev1.Pod); ok && sel.Matches(labels.Set(p.Labels)) {
			out = append(out, p)
		}
	}
	return out
}

// Event records a Kubernetes Event about the agent's ConfigMap (e.g. an
// invalid edit), so that `kubectl describe configmap` shows it.
func (w *Watcher) Event(ctx context.Context, cm *corev1.ConfigMap, eventType, reason, message string) error {
	now := metav1.NewTime(time.Now())
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: cm.Name + ".",
			Namespace:    cm.Namespace,
		},
		InvolvedObject: corev1.ObjectReference{
			Kind:            "ConfigMap",
			APIVersion:      "v1",
			Namespace:       cm.Namespace,
			Name:            cm.Name,
			UID:             cm.UID,
			ResourceVersion: cm.ResourceVersion,
		},
		Reason:              reason,
		Message:             message,
		Type:                eventType,
		Source:              corev1.EventSource{Component: "clovisor", Host: w.opts.Node},
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
		ReportingController: "clovisor.io/agent",
		ReportingInstance:   "clovisor-" + w.opts.Node,
	}
	_, err := w.client.CoreV1().Events(cm.Namespace).Create(ctx, ev, metav1.CreateOptions{})
	return err
}

// Monitor checks every interval that the API server answers (/readyz,
// which every client may read) and logs when it stops and starts
// answering: the informers retry a refused connection silently. It returns
// when ctx is done.
func (w *Watcher) Monitor(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	down := false
	var since time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, interval)
		err := w.client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(rctx).Error()
		cancel()
		if ctx.Err() != nil {
			return
		}
		switch {
		case err != nil && !down:
			down, since = true, time.Now()
			w.log.Warn("kubernetes API server unreachable; watches resume when it is back (the tracing goes on with what is known)",
				"error", err.Error())
		case err == nil && down:
			down = false
			w.log.Info("kubernetes API server reachable again; watches resume", "after", time.Since(since).Round(time.Millisecond).String())
			w.signal()
		}
	}
}
