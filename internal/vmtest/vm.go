package vmtest

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// DefaultTimeout is the host-side limit of one VM run when Options.Timeout
// is zero: boot, command and power-off. Boot alone takes about 5 s under
// software emulation.
const DefaultTimeout = 240 * time.Second

// EnvGuest is set to "1" in the environment of every command run in a VM;
// InGuest reports it. EnvKernel holds the release the host booted (what
// `uname -r` must say) and EnvSeries its series.
const (
	EnvGuest  = "CLOVISOR_VMTEST"
	EnvKernel = "CLOVISOR_VMTEST_KERNEL"
	EnvSeries = "CLOVISOR_VMTEST_SERIES"
)

// InGuest reports whether this process runs inside a vmtest VM. Guest-side
// tests skip themselves unless it is true.
func InGuest() bool { return os.Getenv(EnvGuest) == "1" }

// Options say what a VM runs.
type Options struct {
	// Args is the command line run in the guest, as argv: Args[0] is a path
	// in the guest (e.g. a file of Files) or a busybox applet ("sh", "ip").
	// It runs as root in /tmp with stdin from /dev/null.
	Args []string
	// Files maps guest paths to host files copied into the initramfs
	// (permission bits kept). ELF executables must be statically linked
	// (use Programs for dynamically linked ones).
	Files map[string]string
	// Programs are host programs to copy into the guest, as paths or as
	// names looked up in PATH (e.g. "nginx", "curl", "ip", "bash"). Each
	// goes to its host path (so it is found in the guest's PATH by name
	// too) together with the shared libraries it needs and the dynamic
	// loader, as ldd lists them. See programs.go for what is and is not
	// covered; Files are unpacked after Programs and may override them.
	Programs []string
	// Env adds environment variables for the command.
	Env map[string]string
	// Modules are the kernel modules to load before the command (their
	// dependencies are added); nil means DefaultModules, an empty non-nil
	// slice none.
	Modules []string
	// Timeout limits the whole run on the host; qemu is killed when it
	// passes. Zero means DefaultTimeout.
	Timeout time.Duration
	// GuestTimeout limits the command inside the guest (SIGTERM to its
	// session, SIGKILL 5 s later). Zero derives it from Timeout, leaving
	// time for boot and power-off; negative means no guest-side limit.
	GuestTimeout time.Duration
	// IgnoreExitCode makes a non-zero exit of the command a result rather
	// than a test failure (Result.ExitCode has it).
	IgnoreExitCode bool
	// MemoryMiB and CPUs size the VM; zero means 1024 MiB and 2 CPUs.
	MemoryMiB, CPUs int
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
}

// Result is what a VM run produced.
type Result struct {
	// ExitCode is the command's exit status in the guest (128+N when killed
	// by signal N).
	ExitCode int
	// Output is the command's stdout and stderr, from its own serial port:
	// no kernel messages in it.
	Output string
	// Console is the serial console: kernel log (quiet) and /init's lines.
	Console string
	// Duration is the wall time from starting qemu to its exit.
	Duration time.Duration
	// GuestBoot is the guest's uptime when the command started, GuestRun
	// the guest time the command took (both from /proc/uptime).
	GuestBoot, GuestRun time.Duration
}

// Run boots kernel k under qemu (software emulation) with an initramfs of
// busybox, k's modules, opts.Programs and opts.Files, runs opts.Args as the
// guest's only program and powers off. It fails the test, with the
// command's output and the serial console (from the kernel's first crash
// or bug report when it made one, else its tail), when the VM cannot
// start, the kernel does not boot, setup in the guest fails, a time limit
// passes (qemu is killed), the guest reports no exit code, or the command
// exits non-zero (unless opts.IgnoreExitCode).
//
// VM runs share the host's cores through locks in the cache folder, across
// processes: QEMU runs all of a VM's vCPUs on one host thread
// (single-threaded TCG, see run), so a VM holds one slot out of one per
// host CPU, and as many VMs as the host has CPUs run side by side. The time
// limits start once the slot is held.
func Run(t testing.TB, k Kernel, opts Options) Result {
	t.Helper()
	testbed.RequireTool(t, "qemu-system-x86_64")
	testbed.RequireTool(t, "busybox")
	if len(opts.Args) == 0 {
		t.Fatalf("vmtest.Run: no command (Options.Args is empty)")
	}
	res, err := run(t, k, opts)
	if err != nil {
		t.Fatalf("vmtest: %s: %v", k, err)
	}
	t.Logf("vmtest: %s: %q exited %d; qemu ran %v (guest: boot %v, command %v)",
		k, strings.Join(opts.Args, " "), res.ExitCode, res.Duration.Round(time.Millisecond),
		res.GuestBoot.Round(time.Millisecond), res.GuestRun.Round(time.Millisecond))
	return res
}

// limits returns the host-side limit and the guest-side one (<= 0: none)
// that opts ask for, defaults applied. The default guest limit leaves up to
// 30 s (a quarter of short limits) for boot and power-off.
func (o Options) limits() (host, guest time.Duration) {
	host = o.Timeout
	if host <= 0 {
		host = DefaultTimeout
	}
	guest = o.GuestTimeout
	if guest == 0 {
		guest = host - min(30*time.Second, host/4)
	}
	return host, guest
}

// run does Run's work and returns its failures as an error that holds the
// evidence (output, console tail).
func run(t testing.TB, k Kernel, opts Options) (Result, error) {
	var res Result
	timeout, guestLimit := opts.limits()
	limitSecs := 0
	if guestLimit > 0 {
		limitSecs = max(1, int(guestLimit/time.Second))
	}
	modules := opts.Modules
	if modules == nil {
		modules = DefaultModules
	}

	env := map[string]string{}
	if ci := os.Getenv("CI"); ci != "" {
		env["CI"] = ci
	}
	for key, v := range opts.Env {
		env[key] = v
	}
	env[EnvGuest] = "1"
	env[EnvKernel] = k.Version
	env[EnvSeries] = k.Series
	env["CLOVISOR_VM_LIMIT"] = strconv.Itoa(limitSecs)

	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.gz")
	if err := writeInitrd(initrd, k, modules, opts, env); err != nil {
		return res, fmt.Errorf("building the initramfs: %w", err)
	}

	mem, cpus := opts.MemoryMiB, opts.CPUs
	if mem <= 0 {
		mem = 1024
	}
	if cpus <= 0 {
		cpus = 2
	}
	// One host thread runs all the guest's vCPUs (below): a VM takes one
	// host CPU.
	unlock, err := lockVMs(t, 1)
	if err != nil {
		return res, err
	}
	defer unlock()

	console := filepath.Join(dir, "console.log")
	output := filepath.Join(dir, "output.log")
	appendArgs := append([]string{"console=ttyS0", "quiet", "panic=-1"}, opts.KernelArgs...)
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
		// "max": every CPU feature TCG emulates (RDRAND seeds the guest's
		// RNG at once; Go binaries need no more than SSE2).
		"-cpu", "max",
		// Single-threaded TCG: QEMU's multi-threaded TCG (7.2) lets a
		// vCPU run code another vCPU has just patched with the
		// kernel's text_poke_bp (static keys flipped by tracepoints,
		// kprobes, BPF attach), and the guest dies of an unexpected
		// int3 ("Oops: int3", "Fatal exception in interrupt"): in
		// about 1 of 30 boots of 6.12, and at once when tracepoints
		// are switched on and off while both vCPUs run.
		"-accel", "tcg,thread=single",
		"-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus),
		"-no-reboot",
		"-kernel", k.Vmlinuz(), "-initrd", initrd,
		"-append", strings.Join(appendArgs, " "),
		"-serial", "file:" + console, // ttyS0: kernel and /init
		"-serial", "file:" + output, // ttyS1: the command's output
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	runErr := cmd.Run()
	res.Duration = time.Since(start)

	cons, _ := os.ReadFile(console)
	res.Console = strings.ReplaceAll(string(cons), "\r\n", "\n")
	out, _ := os.ReadFile(output)
	parsed := parseOutput(strings.ReplaceAll(string(out), "\r\n", "\n"))
	// /init says each marker on the console too: when the output port
	// lost its last lines at power-off, the console still has them.
	if p, lost := withConsoleMarkers(parsed, parseOutput(res.Console)); lost {
		parsed = p
		t.Logf("vmtest: %s: the output port lost /init's last markers; exit code %d read from the console", k.Series, parsed.exit)
	}
	res.Output = parsed.output
	res.ExitCode = parsed.exit
	res.GuestBoot, res.GuestRun = parsed.boot, parsed.run

	evidence := func() string {
		var b strings.Builder
		if s := strings.TrimSpace(qemuOut.String()); s != "" {
			fmt.Fprintf(&b, "\n--- qemu said:\n%s", tail(s, 2000))
		}
		fmt.Fprintf(&b, "\n--- guest command output:\n%s", tail(res.Output, 16000))
		fmt.Fprintf(&b, "\n--- serial console%s", consoleEvidence(res.Console))
		return b.String()
	}
	switch {
	case ctx.Err() != nil:
		what := "the kernel did not boot in time"
		if parsed.started {
			what = "the command did not finish"
			if limitSecs > 0 {
				what += fmt.Sprintf(", nor did the guest's own %ds limit end it", limitSecs)
			}
		}
		return res, fmt.Errorf("timed out after %v, qemu killed: %s%s", timeout, what, evidence())
	case parsed.setupErr != "":
		return res, fmt.Errorf("guest setup failed in /init: %s%s", parsed.setupErr, evidence())
	case runErr != nil && !parsed.exited:
		return res, fmt.Errorf("qemu failed: %v%s", runErr, evidence())
	case !parsed.started:
		return res, fmt.Errorf("the guest never started the command (kernel did not boot or /init failed)%s", evidence())
	case !parsed.exited:
		return res, fmt.Errorf("the guest reported no exit code (kernel panic, or /init or the output port died)%s", evidence())
	case parsed.guestTimeout != "":
		return res, fmt.Errorf("command exceeded the guest time limit of %ss and was killed (exit %d)%s",
			parsed.guestTimeout, res.ExitCode, evidence())
	case res.ExitCode != 0 && !opts.IgnoreExitCode:
		return res, fmt.Errorf("command %q exited %d in the guest%s", strings.Join(opts.Args, " "), res.ExitCode, evidence())
	}
	return res, nil
}

// writeInitrd writes the initramfs: the cached base archive, the (cached)
// archive of opts.Programs and the per-run archive, concatenated (the
// kernel unpacks one after the other), gzip-compressed at the fastest
// level.
func writeInitrd(path string, k Kernel, modules []string, opts Options, env map[string]string) error {
	base, err := baseArchive(k, modules)
	if err != nil {
		return err
	}
	programs, err := programsArchive(opts.Programs)
	if err != nil {
		return err
	}
	perRun, err := runArchive(opts, env)
	if err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	z, _ := gzip.NewWriterLevel(f, gzip.BestSpeed)
	for _, b := range [][]byte{base, programs, perRun} {
		if _, err := z.Write(b); err != nil {
			f.Close()
			return err
		}
	}
	if err := z.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// parsedOutput is what the marker lines on the output port said.
type parsedOutput struct {
	output       string
	started      bool
	exited       bool
	exit         int
	setupErr     string
	guestTimeout string
	boot, run    time.Duration
}

// withConsoleMarkers fills in the markers the output port lacks from
// those of the console (where /init says each one too), and tells whether
// it took any. The command's output is the port's alone.
func withConsoleMarkers(port, console parsedOutput) (parsedOutput, bool) {
	p, took := port, false
	if !p.started && console.started {
		p.started, p.boot, took = true, console.boot, true
	}
	if !p.exited && console.exited {
		p.exited, p.exit, p.run, took = true, console.exit, console.run, true
	}
	if p.setupErr == "" && console.setupErr != "" {
		p.setupErr, took = console.setupErr, true
	}
	if p.guestTimeout == "" && console.guestTimeout != "" {
		p.guestTimeout, took = console.guestTimeout, true
	}
	return p, took
}

// parseOutput separates the command's output from the harness's markers.
func parseOutput(s string) parsedOutput {
	var p parsedOutput
	var out strings.Builder
	var startUp, endUp float64
	for _, line := range strings.SplitAfter(s, "\n") {
		l := strings.TrimRight(line, "\n")
		switch {
		case strings.HasPrefix(l, markerStart+" uptime="):
			p.started = true
			startUp, _ = strconv.ParseFloat(strings.TrimPrefix(l, markerStart+" uptime="), 64)
			continue
		case strings.HasPrefix(l, markerEnd+" uptime="):
			endUp, _ = strconv.ParseFloat(strings.TrimPrefix(l, markerEnd+" uptime="), 64)
			continue
		case strings.HasPrefix(l, markerExit):
			if n, err := strconv.Atoi(strings.TrimPrefix(l, markerExit)); err == nil {
				p.exited, p.exit = true, n
				continue
			}
		case strings.HasPrefix(l, markerSetup):
			p.setupErr = strings.TrimPrefix(l, markerSetup)
			continue
		case strings.HasPrefix(l, markerTimeout):
			p.guestTimeout = strings.TrimPrefix(l, markerTimeout)
			continue
		}
		if p.started && !p.exited {
			out.WriteString(line)
		}
	}
	p.output = out.String()
	p.boot = time.Duration(startUp * float64(time.Second))
	if endUp >= startUp && p.exited {
		p.run = time.Duration((endUp - startUp) * float64(time.Second))
	}
	return p
}

// lockVMs takes min(cpus, host CPUs) of the VM slots, one per host CPU,
// shared by every test process through lock files in the cache folder
// (slot 0 is vm.lock, the lock of earlier versions, which serialised all
// VM runs), waiting as long as the test may. A VM that needs every slot
// takes them in order, blocking; one that needs fewer polls for free ones,
// so two small VMs never hold slots the other waits for.
func lockVMs(t testing.TB, cpus int) (func(), error) {
	dir := cacheDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	n := max(1, runtime.NumCPU())
	need := min(max(1, cpus), n)
	slots := make([]*os.File, n)
	closeAll := func() {
		for i, f := range slots {
			if f != nil {
				f.Close() // releases the lock
				slots[i] = nil
			}
		}
	}
	for i := range slots {
		name := "vm.lock"
		if i > 0 {
			name = fmt.Sprintf("vm.lock.%d", i)
		}
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			closeAll()
			return nil, err
		}
		slots[i] = f
	}
	flock := func(f *os.File, how int) error {
		for {
			err := syscall.Flock(int(f.Fd()), how)
			if !errors.Is(err, syscall.EINTR) {
				return err
			}
		}
	}
	start := time.Now()
	held := make([]bool, n)
	if need == n {
		for i, f := range slots {
			if err := flock(f, syscall.LOCK_EX); err != nil {
				closeAll()
				return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
			}
			held[i] = true
		}
	} else {
		for {
			got := 0
			for i, f := range slots {
				if got == need {
					break
				}
				err := flock(f, syscall.LOCK_EX|syscall.LOCK_NB)
				switch {
				case err == nil:
					held[i] = true
					got++
				case !errors.Is(err, syscall.EWOULDBLOCK):
					closeAll()
					return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
				}
			}
			if got == need {
				break
			}
			for i, f := range slots {
				if held[i] {
					_ = flock(f, syscall.LOCK_UN)
					held[i] = false
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// Keep only the slots held open (closing a file drops its lock).
	for i, f := range slots {
		if !held[i] {
			f.Close()
			slots[i] = nil
		}
	}
	w := time.Since(start)
	lockWaited.Store(int64(w))
	if w > time.Second {
		t.Logf("vmtest: waited %v for other VMs to finish", w.Round(time.Millisecond))
	}
	return closeAll, nil
}

// lockWaited is how long the last VM of this process waited for the lock
// (tests of the time limits, which start once the lock is held).
var lockWaited atomic.Int64

// cacheDir is the cache folder shared with the scripts.
func cacheDir() string {
	if d := os.Getenv("CLOVISOR_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "clovisor-testbed")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "clovisor-testbed")
	}
	return filepath.Join(home, ".cache", "clovisor-testbed")
}

// kernelTrouble are the lines with which the kernel starts its reports of
// a crash or a bug.
var kernelTrouble = []string{"Oops:", "BUG:", "Kernel panic", "WARNING:", "general protection fault", "Unable to handle"}

// consoleEvidence is the part of a guest's console that tells why it
// failed: from the kernel's first crash or bug report on (with the lines
// before it) when there is one, since the whole report, its first lines
// most of all, is what tells the cause; its last 4,000 bytes otherwise.
func consoleEvidence(console string) string {
	first := -1
	for _, m := range kernelTrouble {
		if i := strings.Index(console, m); i >= 0 && (first < 0 || i < first) {
			first = i
		}
	}
	if first < 0 {
		return " (tail):\n" + tail(console, 4000)
	}
	start := max(0, first-1500)
	if i := strings.IndexByte(console[start:], '\n'); start > 0 && i >= 0 && start+i < first {
		start += i + 1
	}
	end := min(len(console), start+24000)
	s := console[start:end]
	if start > 0 {
		s = "[...]\n" + s
	}
	if end < len(console) {
		s += "\n[...]\n" + tail(console[end:], 2000)
	}
	return " (from the kernel's first report):\n" + s
}

// tail returns at most the last n bytes of s, from a line boundary.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "[...]\n" + s
}
