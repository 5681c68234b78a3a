package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// HTTPPair is a client and a server "pod": two network namespaces joined
// by a veth pair (IPv4 and IPv6), each with its own cgroup, and nginx
// serving a directory in the server's.
type HTTPPair struct {
	ClientNS, ServerNS *Netns
	ClientCG, ServerCG *Cgroup
	// ClientIP/ServerIP (IPv4) and ClientIP6/ServerIP6 (IPv6).
	ClientIP, ServerIP, ClientIP6, ServerIP6 netip.Addr
	// Port is nginx's port on both addresses.
	Port uint16
	// Root is the directory nginx serves.
	Root string
}

// Test addresses: only ever inside the test's own namespaces.
var (
	pairClient4 = netip.MustParsePrefix("10.201.7.1/24")
	pairServer4 = netip.MustParsePrefix("10.201.7.2/24")
	pairClient6 = netip.MustParsePrefix("fd00:c10:7::1/64")
	pairServer6 = netip.MustParsePrefix("fd00:c10:7::2/64")
)

// newPair builds the namespaces, the veth pair and the cgroups of a pair,
// without a server.
func newPair(t testing.TB) *HTTPPair {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "nginx")
	p := &HTTPPair{
		ClientNS: NewNetns(t, "cli"), ServerNS: NewNetns(t, "srv"),
		ClientIP: pairClient4.Addr(), ServerIP: pairServer4.Addr(),
		ClientIP6: pairClient6.Addr(), ServerIP6: pairServer6.Addr(),
		Port: 8080,
		Root: t.TempDir(),
	}
	veth := VethPair(t, p.ClientNS, p.ServerNS, pairClient4, pairServer4)
	p.ClientNS.IP(t, "addr", "add", pairClient6.String(), "dev", veth.A, "nodad")
	p.ServerNS.IP(t, "addr", "add", pairServer6.String(), "dev", veth.B, "nodad")
	p.ClientCG = NewCgroup(t, "cli")
	p.ServerCG = NewCgroup(t, "srv")
	return p
}

// NewHTTPPair builds the pair and starts nginx (one worker) in the server
// namespace and cgroup. Everything is removed when the test ends.
func NewHTTPPair(t testing.TB) *HTTPPair {
	t.Helper()
	p := newPair(t)
	startNginx(t, nginxConfig{ns: p.ServerNS, cgroup: p.ServerCG, port: p.Port, root: p.Root,
		addrs: []netip.Addr{p.ServerIP, p.ServerIP6}})
	return p
}

// nginxConfig describes a test nginx.
type nginxConfig struct {
	ns     *Netns
	cgroup *Cgroup // nil: the test's own
	port   uint16
	root   string
	addrs  []netip.Addr // listen on each; readiness is checked on the first
	// certFile and keyFile make it serve HTTPS.
	certFile, keyFile string
	// sendfile lets nginx send files with sendfile(2) (no payload for the
	// socket tracer to see) instead of read+write.
	sendfile bool
	// locations are more nginx directives for the server block (e.g.
	// location blocks of a proxy).
	locations string
}

// startNginx runs nginx (one worker, as root, keep-alive up to 1000
// requests) serving c.root, with /echo answering "echo\n", /missing-teapot
// 418 and /drop closing the connection without a response (444), and waits
// until it accepts connections.
func startNginx(t testing.TB, c nginxConfig) *Server {
	t.Helper()
	nginx := RequireTool(t, "nginx")
	dir := t.TempDir()
	var listen strings.Builder
	ssl := ""
	if c.certFile != "" {
		ssl = " ssl"
		fmt.Fprintf(&listen, "        ssl_certificate %s;\n        ssl_certificate_key %s;\n", c.certFile, c.keyFile)
		// nginx 1.22 offers TLS 1.3 only when asked to.
		listen.WriteString("        ssl_protocols TLSv1.2 TLSv1.3;\n")
	}
	for _, a := range c.addrs {
		fmt.Fprintf(&listen, "        listen %s%s;\n", netip.AddrPortFrom(a, c.port), ssl)
	}
	sendfile := "off"
	if c.sendfile {
		sendfile = "on"
	}
	conf := fmt.Sprintf(`daemon off;
user root;
master_process on;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    keepalive_requests 1000;
    sendfile %[4]s;
    server {
%[2]s        root %[3]s;
        location /echo { return 200 "echo\n"; }
        location /missing-teapot { return 418; }
        location /drop { return 444; }
%[5]s    }
}
`, dir, listen.String(), c.root, sendfile, c.locations)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, c.ns, c.cgroup, dir, nginx, "-c", confPath, "-e", filepath.Join(dir, "error.log"))
	if len(c.addrs) > 0 {
		waitListening(t, c.ns, netip.AddrPortFrom(c.addrs[0], c.port), filepath.Join(dir, "error.log"))
	}
	return s
}

// URL is http://<server IPv4>:<port><path>.
func (p *HTTPPair) URL(path string) string {
	return fmt.Sprintf("http://%s%s", netip.AddrPortFrom(p.ServerIP, p.Port), path)
}

// URL6 is the same URL on the server's IPv6 address.
func (p *HTTPPair) URL6(path string) string {
	return fmt.Sprintf("http://%s%s", netip.AddrPortFrom(p.ServerIP6, p.Port), path)
}

// WriteFile puts a file into the served directory.
func (p *HTTPPair) WriteFile(t testing.TB, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(p.Root, name), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// Client runs a program in the client namespace and cgroup, waits for it
// and returns its standard output; it fails the test if the program does.
func (p *HTTPPair) Client(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := p.ClientNS.Command(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := p.ClientCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// ClientCommand is like Client but leaves starting and waiting to the
// caller (for clients that run alongside something else).
func (p *HTTPPair) ClientCommand(ctx context.Context, name string, args ...string) (*exec.Cmd, func() error) {
	cmd := p.ClientNS.Command(ctx, name, args...)
	return cmd, func() error { return p.ClientCG.Start(cmd) }
}
