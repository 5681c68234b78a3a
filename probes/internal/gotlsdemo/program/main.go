//go:build ignore

// The Go HTTPS server and client the crypto/tls uprobe tests trace. The
// tests build it (with the machine's Go and older releases, plain and
// stripped), so it must build with Go 1.21 and use only the standard
// library. HTTP/2 is off on both ends (the tracer parses HTTP/1.x).
//
//	main server LISTEN CERT KEY        serve HTTPS until killed ("listening on" first)
//	main client CA BASEURL             the scripted requests, one line each
//	main download CA URL COUNT         GET URL COUNT times, sha256 of each
//	main bench CA URL COUNT            COUNT GETs, then ns per request
//	main raw CA ADDR REQUEST           REQUEST written on a new TLS
//	                                   connection without an explicit
//	                                   handshake; prints the answer's size
package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: %s server|client|download|bench ...", os.Args[0]))
	}
	switch os.Args[1] {
	case "server":
		fail(serve(os.Args[2], os.Args[3], os.Args[4]))
	case "client":
		fail(script(client(os.Args[2]), os.Args[3]))
	case "download":
		n, _ := strconv.Atoi(os.Args[4])
		fail(download(client(os.Args[2]), os.Args[3], n))
	case "raw":
		fail(raw(os.Args[2], os.Args[3], os.Args[4]))
	case "bench":
		n, _ := strconv.Atoi(os.Args[4])
		fail(bench(client(os.Args[2]), os.Args[3], n))
	}
}

func fail(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// HelloBody is what GET /hello answers.
var helloBody = []byte(strings.Repeat("0123456789", 123) + "\n")

// bigBody is n bytes of a fixed pseudo-random sequence.
func bigBody(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func serve(addr, cert, key string) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(helloBody)
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil || r.Method != http.MethodPost {
			http.Error(w, "want a POST body", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(body)
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		body := bigBody(n)
		w.Header().Set("Content-Length", strconv.Itoa(n))
		// In pieces, with a pause between, so that a download is
		// under way for a while.
		for len(body) > 0 {
			k := min(len(body), 64<<10)
			if _, err := w.Write(body[:k]); err != nil {
				return
			}
			body = body[k:]
			w.(http.Flusher).Flush()
			time.Sleep(time.Millisecond)
		}
	})
	srv := &http.Server{
		Handler:      mux,
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening on", ln.Addr())
	return srv.ServeTLS(ln, cert, key)
}

func client(caFile string) *http.Client {
	pem, err := os.ReadFile(caFile)
	fail(err)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		fail(fmt.Errorf("no certificate in %s", caFile))
	}
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
	}}
}

// script makes the requests the tests check, over one keep-alive
// connection, and prints "METHOD PATH STATUS BODYBYTES" for each.
func script(c *http.Client, base string) error {
	post := bytes.Repeat([]byte("p"), 3000)
	for _, r := range []struct {
		method, path string
		body         []byte
	}{
		{"GET", "/hello", nil},
		{"POST", "/echo", post},
		{"GET", "/nope", nil},
		{"GET", "/hello", nil},
	} {
		req, err := http.NewRequest(r.method, base+r.path, bytes.NewReader(r.body))
		if err != nil {
			return err
		}
		if r.body == nil {
			req.Body = nil
		}
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		fmt.Printf("%s %s %d %d\n", r.method, r.path, resp.StatusCode, n)
	}
	return nil
}

// download GETs url count times over one connection and prints each
// body's length and SHA-256.
func download(c *http.Client, url string, count int) error {
	for i := 0; i < count; i++ {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		fmt.Printf("%d %d %x\n", resp.StatusCode, n, h.Sum(nil))
	}
	return nil
}

// bench GETs url count times over one connection and prints the mean
// time per request in nanoseconds.
func bench(c *http.Client, url string, count int) error {
	start := time.Now()
	for i := 0; i < count; i++ {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
	}
	fmt.Println(time.Since(start).Nanoseconds() / int64(count))
	return nil
}

// raw writes request on a TLS connection whose handshake happens inside
// that first Write, reads the answer until the server closes, and prints
// its length.
func raw(caFile, addr, request string) error {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	host, _, _ := net.SplitHostPort(addr)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: host})
	defer tc.Close()
	if _, err := tc.Write([]byte(request)); err != nil {
		return err
	}
	answer, err := io.ReadAll(tc)
	if err != nil {
		return err
	}
	fmt.Println(len(answer))
	return nil
}
