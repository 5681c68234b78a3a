package testbed

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Cert is a self-signed certificate (its own CA) and its key, as PEM files.
type Cert struct {
	CertFile, KeyFile string
}

// SelfSignedCert makes a self-signed ECDSA P-256 certificate for these IP
// addresses and DNS names, valid for a day, in a temporary folder of the
// test. Clients trust it with e.g. `curl --cacert CertFile`.
func SelfSignedCert(t testing.TB, ips []netip.Addr, names ...string) *Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "clovisor test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		DNSNames:              names,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.IP(ip.AsSlice()))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &Cert{CertFile: filepath.Join(dir, "cert.pem"), KeyFile: filepath.Join(dir, "key.pem")}
	if err := os.WriteFile(c.CertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// TLSPair is an HTTPPair whose nginx serves HTTPS (OpenSSL, one worker)
// on Port, with a self-signed certificate for the server's addresses.
type TLSPair struct {
	*HTTPPair
	Cert *Cert
	// Nginx is the server's nginx (master; its one worker is a child).
	Nginx *Server
}

// NewTLSPair builds the pair and starts nginx with TLS on port 8443 of
// the server's IPv4 and IPv6 addresses.
func NewTLSPair(t testing.TB) *TLSPair {
	t.Helper()
	p := newPair(t)
	p.Port = 8443
	cert := SelfSignedCert(t, []netip.Addr{p.ServerIP, p.ServerIP6}, "server")
	srv := startNginx(t, nginxConfig{ns: p.ServerNS, cgroup: p.ServerCG, port: p.Port, root: p.Root,
		addrs: []netip.Addr{p.ServerIP, p.ServerIP6}, certFile: cert.CertFile, keyFile: cert.KeyFile})
	return &TLSPair{HTTPPair: p, Cert: cert, Nginx: srv}
}

// URL is https://<server IPv4>:<port><path>.
func (p *TLSPair) URL(path string) string {
	return fmt.Sprintf("https://%s%s", netip.AddrPortFrom(p.ServerIP, p.Port), path)
}

// StartTLSProxy starts a second nginx in the client's namespace and
// cgroup that listens for plaintext HTTP on 127.0.0.1:port and forwards
// every request under /up/ to the TLS server over HTTPS (a TLS-originating
// sidecar, as an Envoy or Istio proxy is), verifying the server's
// certificate for the name "server" (sent as SNI). It returns the proxy's
// nginx.
func (p *TLSPair) StartTLSProxy(t testing.TB, port uint16) *Server {
	t.Helper()
	loc := fmt.Sprintf(`        location /up/ {
            proxy_pass https://%s/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate %s;
            proxy_ssl_verify on;
            proxy_ssl_name server;
            proxy_ssl_server_name on;
        }
`, netip.AddrPortFrom(p.ServerIP, p.Port), p.Cert.CertFile)
	return startNginx(t, nginxConfig{ns: p.ClientNS, cgroup: p.ClientCG, port: port, root: p.Root,
		addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, locations: loc})
}

// OpenSSL11 returns the openssl command-line program of OpenSSL 1.1.1
// (Debian 11's packages, fetched once by scripts/openssl11.sh into the
// cache folder) and the folder of its libssl.so.1.1 and libcrypto.so.1.1:
// run it with LD_LIBRARY_PATH=libDir.
func OpenSSL11(t testing.TB) (bin, libDir string) {
	t.Helper()
	RequireTool(t, "apt-get")
	RequireTool(t, "dpkg-deb")
	bin = cachedBinary(t, "OpenSSL11", "openssl11.sh")
	return bin, filepath.Join(filepath.Dir(filepath.Dir(bin)), "lib", "x86_64-linux-gnu")
}
