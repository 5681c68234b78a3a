package gotlsdemo

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// ClientAddr and ServerAddr are the pods' addresses (only inside the
// tests' own network namespaces); the server listens on Port.
var (
	ClientAddr = netip.MustParsePrefix("10.201.44.1/24")
	ServerAddr = netip.MustParsePrefix("10.201.44.2/24")
)

const Port = 8443

// Pair is a client and a server "pod" (network namespace + cgroup)
// and a certificate for the server.
type Pair struct {
	ClientNS, ServerNS *testbed.Netns
	ClientCG, ServerCG *testbed.Cgroup
	Cert, Key          string
}

// NewPair makes the pods (removed when the test ends).
func NewPair(t testing.TB) *Pair {
	t.Helper()
	testbed.RequireRoot(t)
	p := &Pair{
		ClientNS: testbed.NewNetns(t, "gotls-cli"), ServerNS: testbed.NewNetns(t, "gotls-srv"),
		ClientCG: testbed.NewCgroup(t, "gotls-cli"), ServerCG: testbed.NewCgroup(t, "gotls-srv"),
	}
	testbed.VethPair(t, p.ClientNS, p.ServerNS, ClientAddr, ServerAddr)
	c := testbed.SelfSignedCert(t, []netip.Addr{ServerAddr.Addr()})
	p.Cert, p.Key = c.CertFile, c.KeyFile
	return p
}

// URL is https://<server>:<port><path>.
func (p *Pair) URL(path string) string {
	return fmt.Sprintf("https://%s%s", netip.AddrPortFrom(ServerAddr.Addr(), Port), path)
}

// StartServer runs the demo server in the server pod until the test ends
// and returns its process.
func (p *Pair) StartServer(t testing.TB, bin string) *exec.Cmd {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := p.ServerNS.Command(ctx, bin, "server", netip.AddrPortFrom(ServerAddr.Addr(), Port).String(), p.Cert, p.Key)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := p.ServerCG.Start(cmd); err != nil {
		cancel()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		<-exited
	})
	first := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			first <- sc.Text()
		}
		close(first)
		io.Copy(io.Discard, out)
		cmd.Wait()
		close(exited)
	}()
	select {
	case line := <-first:
		if !strings.HasPrefix(line, "listening on ") {
			t.Fatalf("server: %q", line)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server did not start listening in 10 s")
	}
	return cmd
}

// Client runs the demo program in the client pod with args (after the
// mode, the CA file is inserted) and returns a command to start.
func (p *Pair) Client(ctx context.Context, bin, mode string, args ...string) *exec.Cmd {
	cmd := p.ClientNS.Command(ctx, bin, append([]string{mode, p.Cert}, args...)...)
	cmd.Stderr = os.Stderr
	return cmd
}

// RunClient runs the client to its end and returns its output and pid.
func (p *Pair) RunClient(t testing.TB, bin, mode string, args ...string) (string, uint32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := p.Client(ctx, bin, mode, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := p.ClientCG.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("client %s: %v\n%s", mode, err, out.String())
	}
	return out.String(), uint32(cmd.Process.Pid)
}
