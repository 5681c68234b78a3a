package testbed

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// With the cgroup filter, Clovisor's TLS tracing probes each traced
// process on its own, some milliseconds after it starts or maps a library:
// the first SSL calls of a short-lived client (a curl) would not be seen.
// Tests of such clients run them through an exec wrapper, which makes the
// process probed before the client's first instruction, as it is in a
// process that maps the library and executes the client later.
//
// Run with EnvExecProbed set, a test binary whose TestMain calls
// ExecProbedMain first is that wrapper: it maps each file the variable
// names (colon-separated) executable, as a dynamic loader does, waits for
// a byte on descriptor 3, and executes os.Args[1:] from the main thread
// (the thread group leader, whose task the uprobe links name: they outlive
// the exec, and the kernel sets their breakpoints when the client's loader
// maps the same files).
const EnvExecProbed = "CLOVISOR_TEST_EXEC_PROBED"

func init() {
	if os.Getenv(EnvExecProbed) != "" {
		runtime.LockOSThread() // the main goroutine stays on the main thread
	}
}

// ExecProbedMain, called first in TestMain, runs the exec wrapper when the
// process is one (and then never returns).
func ExecProbedMain() {
	if files := os.Getenv(EnvExecProbed); files != "" && len(os.Args) > 1 {
		os.Exit(execProbed(strings.Split(files, ":"), os.Args[1:]))
	}
}

func execProbed(files []string, argv []string) int {
	for _, f := range files {
		fd, err := syscall.Open(f, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "exec wrapper:", err)
			return 1
		}
		var st syscall.Stat_t
		if err := syscall.Fstat(fd, &st); err != nil {
			fmt.Fprintln(os.Stderr, "exec wrapper:", err)
			return 1
		}
		// Left mapped until the exec.
		if _, err := syscall.Mmap(fd, 0, int(st.Size), syscall.PROT_READ|syscall.PROT_EXEC, syscall.MAP_PRIVATE); err != nil {
			fmt.Fprintln(os.Stderr, "exec wrapper: mmap", f, err)
			return 1
		}
		syscall.Close(fd)
	}
	ready := os.NewFile(3, "ready")
	if _, err := ready.Read(make([]byte, 1)); err != nil {
		fmt.Fprintln(os.Stderr, "exec wrapper:", err)
		return 1
	}
	ready.Close()
	path, err := exec.LookPath(argv[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "exec wrapper:", err)
		return 1
	}
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, EnvExecProbed+"=") {
			env = append(env, e)
		}
	}
	err = syscall.Exec(path, argv, env)
	fmt.Fprintln(os.Stderr, "exec wrapper: exec", path, err)
	return 1
}

// ProbedArgs are the program and arguments that run name with args through
// the exec wrapper (the running test binary).
func ProbedArgs(t testing.TB, name string, args ...string) (string, []string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return self, append([]string{name}, args...)
}

// ProbedStart wraps start, which starts cmd (made with ProbedArgs): the
// returned function starts it, waits (up to 10 s) until probed(pid) says
// that TLS tracing has probed its process in files, then lets it execute
// the program.
func ProbedStart(t testing.TB, cmd *exec.Cmd, start func() error, probed func(pid int) bool, files ...string) func() error {
	t.Helper()
	if len(cmd.ExtraFiles) != 0 {
		t.Fatal("ProbedStart: the command has extra files already")
	}
	return func() error {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		defer w.Close()
		cmd.ExtraFiles = []*os.File{r}
		if cmd.Env == nil {
			cmd.Env = os.Environ()
		}
		cmd.Env = append(cmd.Env, EnvExecProbed+"="+strings.Join(files, ":"))
		err = start()
		r.Close()
		if err != nil {
			return err
		}
		deadline := time.Now().Add(10 * time.Second)
		for !probed(cmd.Process.Pid) {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				return fmt.Errorf("the exec wrapper of %v (pid %d) was not probed in %v after 10 s", cmd.Args, cmd.Process.Pid, files)
			}
			time.Sleep(5 * time.Millisecond)
		}
		_, err = w.Write([]byte{1})
		return err
	}
}

// Inode is the inode number of a file.
func Inode(t testing.TB, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}
