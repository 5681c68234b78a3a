package testbed

// A real Kubernetes control plane for tests: etcd (Debian's etcd-server
// package) and kube-apiserver (built once by scripts/kube-apiserver.sh), both
// on free 127.0.0.1 ports, with no controller-manager, scheduler or kubelet.
//
// Pods created in it stay Pending; a test plays the kubelet by writing the
// pod's status itself (SetPodRunning). Create pods with spec.nodeName set when
// the code under test selects them by node, as a DaemonSet's pods do.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// KubeVersion is the version of the kube-apiserver StartKube runs.
const KubeVersion = "v1.35.4"

// KubeAdmin is the name of the user every Kube has: authenticated by a bearer
// token and a member of system:masters, so allowed everything in either
// authorization mode. Kubeconfig and Kubectl act as this user.
const KubeAdmin = "admin"

// KubeServiceCIDR is the --service-cluster-ip-range: Services' cluster IPs are
// allocated from it (10.96.0.1 is the "kubernetes" Service's).
const KubeServiceCIDR = "10.96.0.0/24"

const (
	etcdReadyTimeout      = 30 * time.Second
	apiserverReadyTimeout = 90 * time.Second
	kubeStopTimeout       = 30 * time.Second
	kubectlTimeout        = 2 * time.Minute
)

// KubeOptions configures StartKube. The zero value is an AlwaysAllow API
// server with only the admin user.
type KubeOptions struct {
	// RBAC runs the API server with --authorization-mode=RBAC, so users
	// other than the admin may do only what Roles and ClusterRoles bound to
	// them allow (the default ClusterRoles such as "view" exist). Without
	// it the mode is AlwaysAllow: every authenticated user may do anything.
	RBAC bool
	// Users are token-authenticated users besides the admin; each gets its
	// own token and kubeconfig (see KubeconfigFor, KubectlAs, Token).
	Users []KubeUser
	// APIServerFlags are appended to kube-apiserver's command line (a flag
	// given again overrides the testbed's value), e.g. "--v=4".
	APIServerFlags []string
}

// KubeUser is a user the API server authenticates by a bearer token (its
// --token-auth-file).
type KubeUser struct {
	// Name is the user name, as RBAC subjects (kind User) refer to it.
	Name string
	// Groups lists the user's groups; the API server adds
	// system:authenticated itself.
	Groups []string
}

// Kube is a kube-apiserver backed by its own etcd, both on 127.0.0.1 ports
// chosen at run time and stopped when the test ends (the API server first).
// Create it with StartKube.
type Kube struct {
	opts    KubeOptions
	dir     string
	port    int // kube-apiserver's secure port
	etcdURL string
	bin     string // kube-apiserver binary
	args    []string
	caPEM   []byte
	client  *http.Client

	tokens      map[string]string // user -> bearer token
	kubeconfigs map[string]string // user -> kubeconfig path

	mu        sync.Mutex
	etcd      *kubeProc
	apiserver *kubeProc // nil while stopped
	starts    int       // API server starts so far
}

// kubeProc is one running etcd or kube-apiserver.
type kubeProc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	err     error // Wait's result, once exited is closed
}

// StartKube starts etcd and kube-apiserver KubeVersion (building it once,
// cached, with scripts/kube-apiserver.sh) on free 127.0.0.1 ports, waits until
// the API server's /readyz answers 200, writes a kubeconfig for the admin and
// one for each of opts.Users, and stops both when the test ends.
//
// It needs etcd in PATH (Debian's etcd-server, see scripts/setup.sh): without
// it the test is skipped, or failed with CI=true. Root is not needed.
func StartKube(t testing.TB, opts KubeOptions) *Kube {
	t.Helper()
	RequireTool(t, "etcd")
	if t.Skipped() {
		return nil
	}
	bin := kubeAPIServerBinary(t)
	k, err := startKube(t, opts, bin)
	if err != nil {
		t.Fatalf("StartKube: %v", err)
	}
	return k
}

// kubeAPIServerBinary runs scripts/kube-apiserver.sh, which prints the cached
// binary's path (building it first if needed).
func kubeAPIServerBinary(t testing.TB) string {
	t.Helper()
	return cachedBinary(t, "StartKube", "kube-apiserver.sh")
}

// validKubeUserName matches the user names the token file and kubeconfig
// file names can hold unquoted.
var validKubeUserName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@-]*$`)

// startKube does StartKube's work with a given kube-apiserver binary and
// returns setup errors instead of failing the test.
func startKube(t testing.TB, opts KubeOptions, bin string) (*Kube, error) {
	t.Helper()
	k := &Kube{
		opts:        opts,
		dir:         t.TempDir(),
		bin:         bin,
		tokens:      map[string]string{},
		kubeconfigs: map[string]string{},
	}
	users := append([]KubeUser{{Name: KubeAdmin, Groups: []string{"system:masters"}}}, opts.Users...)
	for _, u := range users {
		if !validKubeUserName.MatchString(u.Name) {
			return nil, fmt.Errorf("user name %q: want letters, digits and ._:@- only", u.Name)
		}
		if _, dup := k.tokens[u.Name]; dup {
			return nil, fmt.Errorf("user %q given twice (%q is the built-in admin)", u.Name, KubeAdmin)
		}
		for _, g := range u.Groups {
			if g == "" || strings.ContainsAny(g, `,"`) {
				return nil, fmt.Errorf("user %q: group %q: must be non-empty without commas or quotes", u.Name, g)
			}
		}
		k.tokens[u.Name] = randSuffix(48)
	}
	if err := k.writeFiles(users); err != nil {
		return nil, err
	}
	if err := k.startEtcd(t); err != nil {
		return nil, err
	}
	// Registered after etcd's cleanup, so it runs before it: an etcd that
	// goes away first leaves the API server retrying for about a minute.
	t.Cleanup(func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		if t.Failed() && k.apiserver != nil {
			t.Logf("kube-apiserver log %s (tail):\n%s", k.apiserver.logPath, tail(k.apiserver.logPath, 6000))
		}
		if k.apiserver != nil {
			k.apiserver.stop(kubeStopTimeout)
			k.apiserver = nil
		}
	})

	// The secure port is picked free but not reserved; retry if it got taken.
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		k.port = FreePort(t)
		k.args = k.apiserverArgs()
		if err = k.startAPIServer(); err == nil {
			break
		}
		if !strings.Contains(err.Error(), "address already in use") {
			return nil, err
		}
		t.Logf("StartKube: attempt %d: port %d taken, retrying", attempt, k.port)
	}
	if err != nil {
		return nil, err
	}
	for _, u := range users {
		p := filepath.Join(k.dir, "kubeconfig-"+u.Name)
		if err := k.writeKubeconfig(p, u.Name, k.tokens[u.Name]); err != nil {
			return nil, err
		}
		k.kubeconfigs[u.Name] = p
	}
	return k, nil
}

// writeFiles writes the serving certificate and its CA, the service-account
// key pair and the token file into k.dir.
func (k *Kube) writeFiles(users []KubeUser) error {
	pki := filepath.Join(k.dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return err
	}
	caPEM, certPEM, keyPEM, err := selfSignedServing()
	if err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	k.caPEM = caPEM
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	var tokens strings.Builder
	for _, u := range users {
		// token,user,uid[,"group1,group2"]
		fmt.Fprintf(&tokens, "%s,%s,%s-uid", k.tokens[u.Name], u.Name, u.Name)
		if len(u.Groups) > 0 {
			fmt.Fprintf(&tokens, ",%q", strings.Join(u.Groups, ","))
		}
		tokens.WriteByte('\n')
	}
	for name, data := range map[string][]byte{
		"ca.crt":      caPEM,
		"serving.crt": certPEM,
		"serving.key": keyPEM,
		"sa.key":      pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		"sa.pub":      pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
		"tokens.csv":  []byte(tokens.String()),
	} {
		if err := os.WriteFile(filepath.Join(pki, name), data, 0o600); err != nil {
			return err
		}
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	k.client = &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	return nil
}

// selfSignedServing makes a CA and a serving certificate it signs for
// 127.0.0.1, ::1, localhost, the "kubernetes" Service's IP and its DNS names.
func selfSignedServing() (caPEM, certPEM, keyPEM []byte, err error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "clovisor-testbed-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, net.IPv4(10, 96, 0, 1)},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default",
			"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

// startEtcd starts etcd on free ports with a fresh data dir, registers its
// cleanup and waits until /health reports healthy.
func (k *Kube) startEtcd(t testing.TB) error {
	t.Helper()
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		client := "http://127.0.0.1:" + strconv.Itoa(FreePort(t))
		peer := "http://127.0.0.1:" + strconv.Itoa(FreePort(t))
		dataDir := filepath.Join(k.dir, fmt.Sprintf("etcd-data-%d", attempt))
		p, err := startKubeProc("etcd", "etcd", []string{
			"--name=clovisor-testbed",
			"--data-dir=" + dataDir,
			"--listen-client-urls=" + client,
			"--advertise-client-urls=" + client,
			"--listen-peer-urls=" + peer,
			"--initial-advertise-peer-urls=" + peer,
			"--initial-cluster=clovisor-testbed=" + peer,
			"--initial-cluster-state=new",
			"--unsafe-no-fsync",
			"--logger=zap",
			"--log-level=warn",
		}, k.dir, filepath.Join(k.dir, "etcd.log"))
		if err != nil {
			return err
		}
		lastErr = waitReady(p, etcdReadyTimeout, func() bool {
			return etcdHealthy(client)
		})
		if lastErr == nil {
			k.etcd = p
			k.etcdURL = client
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("etcd log %s (tail):\n%s", p.logPath, tail(p.logPath, 3000))
				}
				p.stop(kubeStopTimeout)
			})
			return nil
		}
		p.stop(kubeStopTimeout)
		if !strings.Contains(lastErr.Error(), "address already in use") {
			break
		}
		t.Logf("StartKube: etcd attempt %d: port taken, retrying", attempt)
	}
	return lastErr
}

// etcdHealthy reports whether etcd's /health at the client URL says healthy.
func etcdHealthy(clientURL string) bool {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(clientURL + "/health")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode == http.StatusOK && bytes.Contains(b, []byte(`"health":"true"`))
}

// apiserverArgs returns kube-apiserver's command line for k.port.
func (k *Kube) apiserverArgs() []string {
	pki := filepath.Join(k.dir, "pki")
	authz := "AlwaysAllow"
	if k.opts.RBAC {
		authz = "RBAC"
	}
	args := []string{
		"--etcd-servers=" + k.etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(k.port),
		// Only used for files the API server would generate; the serving
		// certificate is ours.
		"--cert-dir=" + filepath.Join(k.dir, "apiserver-certs"),
		"--tls-cert-file=" + filepath.Join(pki, "serving.crt"),
		"--tls-private-key-file=" + filepath.Join(pki, "serving.key"),
		"--token-auth-file=" + filepath.Join(pki, "tokens.csv"),
		"--authorization-mode=" + authz,
		"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(pki, "sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=" + KubeServiceCIDR,
		// No controller-manager creates the "default" ServiceAccount that
		// this admission plugin would require of every pod.
		"--disable-admission-plugins=ServiceAccount",
		// Clovisor's DaemonSet runs privileged pods.
		"--allow-privileged=true",
		// The "kubernetes" Service's endpoints would be 127.0.0.1, which
		// Endpoints may not hold: don't reconcile them.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
	}
	return append(args, k.opts.APIServerFlags...)
}

// startAPIServer starts kube-apiserver with k.args and waits until /readyz
// answers 200. The caller holds k.mu or is the only user of k.
func (k *Kube) startAPIServer() error {
	k.starts++
	logPath := filepath.Join(k.dir, "kube-apiserver.log")
	p, err := startKubeProc("kube-apiserver", k.bin, k.args, k.dir, logPath)
	if err != nil {
		return err
	}
	start := time.Now()
	if err := waitReady(p, apiserverReadyTimeout, k.ready); err != nil {
		p.stop(kubeStopTimeout)
		return fmt.Errorf("%w\n(kube-apiserver %s, start %d, etcd %s)", err, k.Server(), k.starts, k.etcdURL)
	}
	k.apiserver = p
	logf(logPath, "testbed: kube-apiserver ready at %s after %v (start %d)", k.Server(), time.Since(start).Round(time.Millisecond), k.starts)
	return nil
}

// ready reports whether the API server's /readyz answers 200.
func (k *Kube) ready() bool {
	req, err := http.NewRequest(http.MethodGet, k.Server()+"/readyz", nil)
	if err != nil {
		return false
	}
	req.Header.Set("Authorization", "Bearer "+k.tokens[KubeAdmin])
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	resp, err := k.client.Do(req.WithContext(ctx))
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// startKubeProc starts bin with args, appending its output to logPath. The
// process gets SIGKILL if the test binary dies first.
func startKubeProc(name, bin string, args []string, dir, logPath string) (*kubeProc, error) {
	logf(logPath, "testbed: starting %s %s", bin, strings.Join(args, " "))
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child has its own copy
	p := &kubeProc{name: name, logPath: logPath, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Stdout = f
	p.cmd.Stderr = f
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	return p, nil
}

// waitReady polls ready every 100 ms until it reports true, p exits, or
// timeout passes; the error then holds the tail of p's log.
func waitReady(p *kubeProc, timeout time.Duration, ready func() bool) error {
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before becoming ready (%v); log %s (tail):\n%s", p.name, p.err, p.logPath, tail(p.logPath, 4000))
		default:
		}
		if ready() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v; log %s (tail):\n%s", p.name, timeout, p.logPath, tail(p.logPath, 4000))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM, then SIGKILL after timeout, and waits for the exit.
func (p *kubeProc) stop(timeout time.Duration) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(timeout):
		logf(p.logPath, "testbed: %s still running %v after SIGTERM; killing it", p.name, timeout)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// logf appends a line to the log file at path (best effort).
func logf(path, format string, args ...any) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s "+format+"\n", append([]any{time.Now().Format(time.RFC3339Nano)}, args...)...)
}

// StopAPIServer stops the API server (SIGTERM, then SIGKILL after 30 s) and
// leaves etcd running, so StartAPIServer can bring it back with the same
// data. Clients then get "connection refused" on Server().
func (k *Kube) StopAPIServer(t testing.TB) {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.apiserver == nil {
		t.Fatalf("StopAPIServer: the API server is not running")
	}
	start := time.Now()
	k.apiserver.stop(kubeStopTimeout)
	k.apiserver = nil
	t.Logf("StopAPIServer: stopped in %v", time.Since(start).Round(time.Millisecond))
}

// StartAPIServer starts the API server again after StopAPIServer, on the
// same port with the same etcd, certificates and tokens (kubeconfigs stay
// valid), and waits until it is ready.
func (k *Kube) StartAPIServer(t testing.TB) {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.apiserver != nil {
		t.Fatalf("StartAPIServer: the API server is already running")
	}
	start := time.Now()
	if err := k.startAPIServer(); err != nil {
		t.Fatalf("StartAPIServer: %v", err)
	}
	t.Logf("StartAPIServer: ready in %v", time.Since(start).Round(time.Millisecond))
}

// Server returns the API server's URL, https://127.0.0.1:port.
func (k *Kube) Server() string { return "https://127.0.0.1:" + strconv.Itoa(k.port) }

// EtcdURL returns etcd's client URL, http://127.0.0.1:port.
func (k *Kube) EtcdURL() string { return k.etcdURL }

// LogPath returns the path of the file holding kube-apiserver's output (all
// its starts, each preceded by a "testbed: starting" line).
func (k *Kube) LogPath() string { return filepath.Join(k.dir, "kube-apiserver.log") }

// EtcdLogPath returns the path of the file holding etcd's output.
func (k *Kube) EtcdLogPath() string { return filepath.Join(k.dir, "etcd.log") }

// CAFile returns the path of the PEM file of the CA that signed the API
// server's serving certificate (as a pod's ca.crt would be).
func (k *Kube) CAFile() string { return filepath.Join(k.dir, "pki", "ca.crt") }

// HTTPClient returns an HTTP client that trusts the API server's
// certificate. It sends no credentials: add an "Authorization: Bearer"
// header with Token, or use Do.
func (k *Kube) HTTPClient() *http.Client { return k.client }

// Kubeconfig returns the path of a kubeconfig file for the admin.
func (k *Kube) Kubeconfig() string { return k.KubeconfigFor(KubeAdmin) }

// KubeconfigFor returns the path of a kubeconfig file for user, KubeAdmin or
// one of KubeOptions.Users. It panics for other names.
func (k *Kube) KubeconfigFor(user string) string {
	p, ok := k.kubeconfigs[user]
	if !ok {
		panic(fmt.Sprintf("testbed: Kube has no user %q (users: admin and KubeOptions.Users)", user))
	}
	return p
}

// Token returns the bearer token of user, KubeAdmin or one of
// KubeOptions.Users. It panics for other names.
func (k *Kube) Token(user string) string {
	tok, ok := k.tokens[user]
	if !ok {
		panic(fmt.Sprintf("testbed: Kube has no user %q (users: admin and KubeOptions.Users)", user))
	}
	return tok
}

// WriteKubeconfig writes a kubeconfig file that authenticates with the
// bearer token token (e.g. a ServiceAccount's, from `kubectl create token`)
// and returns its path. name names the user in the file.
func (k *Kube) WriteKubeconfig(t testing.TB, name, token string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := k.writeKubeconfig(p, name, token); err != nil {
		t.Fatalf("WriteKubeconfig: %v", err)
	}
	return p
}

// writeKubeconfig writes a kubeconfig (as JSON, which is YAML) for the
// given user name and token to path.
func (k *Kube) writeKubeconfig(path, user, token string) error {
	type named struct {
		Name    string         `json:"name"`
		Cluster map[string]any `json:"cluster,omitempty"`
		User    map[string]any `json:"user,omitempty"`
		Context map[string]any `json:"context,omitempty"`
	}
	ctxName := user + "@clovisor-testbed"
	cfg := map[string]any{
		"apiVersion": "v1",
		"kind":       "Config",
		"clusters": []named{{Name: "clovisor-testbed", Cluster: map[string]any{
			"server":                     k.Server(),
			"certificate-authority-data": k.caPEM, // []byte marshals as base64
		}}},
		"users": []named{{Name: user, User: map[string]any{"token": token}}},
		"contexts": []named{{Name: ctxName, Context: map[string]any{
			"cluster":   "clovisor-testbed",
			"user":      user,
			"namespace": "default",
		}}},
		"current-context": ctxName,
		"preferences":     map[string]any{},
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o600)
}

// Kubectl runs kubectl as the admin with args and returns its standard
// output; it fails the test if kubectl fails.
func (k *Kube) Kubectl(t testing.TB, args ...string) string {
	t.Helper()
	return k.KubectlAs(t, KubeAdmin, args...)
}

// KubectlAs runs kubectl as user (KubeAdmin or one of KubeOptions.Users)
// with args and returns its standard output; it fails the test if kubectl
// fails.
func (k *Kube) KubectlAs(t testing.TB, user string, args ...string) string {
	t.Helper()
	RequireTool(t, "kubectl")
	stdout, stderr, err := k.RunKubectl(user, "", args...)
	if err != nil {
		t.Fatalf("kubectl %s (as %s): %v\n%s%s", strings.Join(args, " "), user, err, stderr, stdout)
	}
	return stdout
}

// Apply runs `kubectl apply -f -` as the admin with manifest (YAML or JSON,
// several documents allowed) on its standard input; it fails the test if
// kubectl fails.
func (k *Kube) Apply(t testing.TB, manifest string) {
	t.Helper()
	RequireTool(t, "kubectl")
	stdout, stderr, err := k.RunKubectl(KubeAdmin, manifest, "apply", "-f", "-")
	if err != nil {
		t.Fatalf("kubectl apply: %v\n%s%s\nmanifest:\n%s", err, stderr, stdout, manifest)
	}
}

// RunKubectl runs kubectl as user (KubeAdmin or one of KubeOptions.Users)
// with args and stdin on its standard input, and returns what it wrote; err
// is non-nil when kubectl fails (e.g. *exec.ExitError). Use it to check
// expected failures; it never fails the test itself. kubectl gets two
// minutes.
func (k *Kube) RunKubectl(user, stdin string, args ...string) (stdout, stderr string, err error) {
	kc, ok := k.kubeconfigs[user]
	if !ok {
		return "", "", fmt.Errorf("no user %q (users: admin and KubeOptions.Users)", user)
	}
	return runKubectl(kc, filepath.Join(k.dir, "kubectl-cache"), stdin, args...)
}

// runKubectl runs kubectl with the kubeconfig kc and the cache in cacheDir.
func runKubectl(kc, cacheDir, stdin string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), kubectlTimeout)
	defer cancel()
	// Global flags first, so they work with any subcommand (also before "--").
	cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig=" + kc, "--cache-dir=" + cacheDir}, args...)...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+kc)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (timed out after %v)", err, kubectlTimeout)
	}
	return out.String(), errb.String(), err
}

// Do sends an HTTP request to the API server as user (KubeAdmin or one of
// KubeOptions.Users; its bearer token) and returns the status code and the
// body. path is absolute, e.g. "/api/v1/namespaces/x/pods". A non-nil body is
// sent as application/merge-patch+json for PATCH and application/json
// otherwise. It fails the test only if no answer arrives; checking the status
// is the caller's job.
func (k *Kube) Do(t testing.TB, user, method, path string, body []byte) (int, []byte) {
	t.Helper()
	code, b, err := k.do(user, method, path, body)
	if err != nil {
		t.Fatalf("%s %s (as %s): %v", method, path, user, err)
	}
	return code, b
}

func (k *Kube) do(user, method, path string, body []byte) (int, []byte, error) {
	tok, ok := k.tokens[user]
	if !ok {
		return 0, nil, fmt.Errorf("no user %q (users: admin and KubeOptions.Users)", user)
	}
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, k.Server()+path, r)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		ct := "application/json"
		if method == http.MethodPatch {
			ct = "application/merge-patch+json"
		}
		req.Header.Set("Content-Type", ct)
	}
	resp, err := k.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// PodRunning is the status SetPodStatus writes: what a kubelet reports once
// a pod's containers run.
type PodRunning struct {
	// PodIP is status.podIP (and the only entry of status.podIPs).
	PodIP string
	// HostIP, if set, is status.hostIP (and the only entry of
	// status.hostIPs): the node's address.
	HostIP string
	// ContainerIDs maps each container of the pod's spec.containers, by
	// name, to its status.containerStatuses[].containerID, in the kubelet's
	// form "<runtime>://<id>", e.g. "containerd://0123...". Every container
	// must be listed.
	ContainerIDs map[string]string
}

// SetPodRunning plays the kubelet for a pod with a single container: it
// writes the pod's status through the status subresource as phase Running,
// Ready, with status.podIP = podIP and the container's containerID =
// containerID (see PodRunning). It fails the test on errors.
func (k *Kube) SetPodRunning(t testing.TB, ns, name, podIP, containerID string) {
	t.Helper()
	spec := k.podContainers(t, ns, name)
	if len(spec) != 1 {
		t.Fatalf("SetPodRunning %s/%s: pod has %d containers %v; use SetPodStatus with one ID each", ns, name, len(spec), spec)
	}
	k.SetPodStatus(t, ns, name, PodRunning{PodIP: podIP, ContainerIDs: map[string]string{spec[0].Name: containerID}})
}

type podContainer struct {
	Name  string `json:"name"`
	Image string `json:"image"`
}

// podContainers returns the spec.containers of a pod.
func (k *Kube) podContainers(t testing.TB, ns, name string) []podContainer {
	t.Helper()
	path := "/api/v1/namespaces/" + ns + "/pods/" + name
	code, b := k.Do(t, KubeAdmin, http.MethodGet, path, nil)
	if code != http.StatusOK {
		t.Fatalf("GET %s: %d: %s", path, code, b)
	}
	var pod struct {
		Spec struct {
			Containers []podContainer `json:"containers"`
		} `json:"spec"`
	}
	if err := json.Unmarshal(b, &pod); err != nil {
		t.Fatalf("GET %s: decoding: %v", path, err)
	}
	return pod.Spec.Containers
}

// SetPodStatus plays the kubelet: it writes, with a JSON merge patch of the
// pods/status subresource, phase Running, the conditions PodScheduled,
// Initialized, ContainersReady and Ready all True, the pod and host IPs, and
// for each container a running, ready status with its containerID. It fails
// the test on errors, also when st.ContainerIDs does not name exactly the
// pod's containers.
func (k *Kube) SetPodStatus(t testing.TB, ns, name string, st PodRunning) {
	t.Helper()
	if net.ParseIP(st.PodIP) == nil {
		t.Fatalf("SetPodStatus %s/%s: pod IP %q is not an IP address", ns, name, st.PodIP)
	}
	spec := k.podContainers(t, ns, name)
	if len(spec) != len(st.ContainerIDs) {
		t.Fatalf("SetPodStatus %s/%s: pod has containers %v, container IDs given for %v", ns, name, spec, st.ContainerIDs)
	}
	now := time.Now().UTC().Format(time.RFC3339)
	var statuses []map[string]any
	for _, c := range spec {
		id, ok := st.ContainerIDs[c.Name]
		if !ok {
			t.Fatalf("SetPodStatus %s/%s: no container ID for container %q (containers %v)", ns, name, c.Name, spec)
		}
		statuses = append(statuses, map[string]any{
			"name":         c.Name,
			"image":        c.Image,
			"imageID":      "",
			"containerID":  id,
			"ready":        true,
			"started":      true,
			"restartCount": 0,
			"state":        map[string]any{"running": map[string]any{"startedAt": now}},
		})
	}
	var conds []map[string]any
	for _, c := range []string{"PodScheduled", "Initialized", "ContainersReady", "Ready"} {
		conds = append(conds, map[string]any{"type": c, "status": "True", "lastTransitionTime": now})
	}
	status := map[string]any{
		"phase":             "Running",
		"podIP":             st.PodIP,
		"podIPs":            []map[string]string{{"ip": st.PodIP}},
		"startTime":         now,
		"conditions":        conds,
		"containerStatuses": statuses,
	}
	if st.HostIP != "" {
		status["hostIP"] = st.HostIP
		status["hostIPs"] = []map[string]string{{"ip": st.HostIP}}
	}
	patch, err := json.Marshal(map[string]any{"status": status})
	if err != nil {
		t.Fatal(err)
	}
	path := "/api/v1/namespaces/" + ns + "/pods/" + name + "/status"
	code, b := k.Do(t, KubeAdmin, http.MethodPatch, path, patch)
	if code != http.StatusOK {
		t.Fatalf("SetPodStatus: PATCH %s: %d: %s\npatch: %s", path, code, b, patch)
	}
}

// Running reports whether the API server is running (not between
// StopAPIServer and StartAPIServer).
func (k *Kube) Running() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.apiserver != nil
}
