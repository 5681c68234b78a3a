// Package vmtest runs tests on a second, real Linux kernel booted under qemu
// (software emulation, no KVM), for what the build machine's kernel cannot
// do: it has no kprobes and no fentry, so Clovisor's kprobe and fentry attach
// modes are tested in a VM as part of the normal test suite.
//
// The kernels are Debian's linux-image-*-cloud-amd64-unsigned packages,
// pinned per series in scripts/vmkernel.sh (6.1 and 6.12, both from
// bookworm-security) and cached outside the checkout in
// ${CLOVISOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clovisor-testbed}/kernels/.
// A VM gets an initramfs made on the fly: busybox-static with its applets,
// the kernel modules the tests need (DefaultModules: veth, sch_ingress,
// cls_bpf, tls, with their dependencies from modules.dep, decompressed), the
// caller's files (Options.Files: static executables and data), host programs
// (Options.Programs, e.g. nginx, curl, iproute2's ip, bash: each at its host
// path with the shared libraries and the dynamic loader it needs, see
// programs.go), /etc/passwd and /etc/group with root, www-data and nobody,
// /var/run -> /run, and an /init that mounts proc, sysfs, devtmpfs, devpts,
// tmpfs (/tmp, /run, /dev/shm), bpffs, tracefs, debugfs and cgroup2, brings
// up lo, loads the modules and runs one command. The command's output goes
// to a serial port of its own (ttyS1), so Result.Output holds no kernel
// messages; the kernel log and /init's lines are on the console (ttyS0,
// Result.Console). /init reports the exit code with a marker line and powers
// off. Boot to power-off takes about 3 s for a shell command and 4-7 s for a
// Go test binary.
//
// Running Go tests in the guest:
//
//	func TestKprobeMode(t *testing.T) {
//		testbed.RequireRoot(t)
//		k := vmtest.LoadKernel(t, "6.1")
//		bin := vmtest.BuildTestBinary(t, "./probes") // CGO_ENABLED=0 go test -c
//		vmtest.RunGoTest(t, k, bin, "^TestGuest", vmtest.Options{})
//	}
//
//	// In the same package: runs only in the VM (vmtest.InGuest), as root.
//	func TestGuestKprobe(t *testing.T) {
//		if !vmtest.InGuest() {
//			t.Skip("runs in a vmtest VM")
//		}
//		... attach in kprobe mode, make traffic, check events ...
//	}
//
// RunGoTest runs the binary with -test.v, logs the guest's test output to the
// host test, and fails the host test with that output when a guest test
// fails. RunGoTests does the same for several runs in one boot (binaries,
// patterns and environments of their own, e.g. one run per attach mode),
// saving a boot per run. Run is the general form (any command line, Options.IgnoreExitCode
// to inspect exit codes). Every failure is a test failure with evidence: a
// kernel that does not boot, a setup step of /init that fails, a command that
// hangs past the host-side Options.Timeout (qemu is killed) or the
// guest-side limit, a missing exit marker, a non-zero exit.
//
// Like internal/testbed's helpers, these skip the test when a tool is missing
// (qemu-system-x86_64, busybox, go) and fail it instead with CI=true;
// scripts/setup.sh installs qemu-system-x86 and busybox-static. VM runs
// share the host's cores across test processes through lock files in the
// cache folder, one slot per host CPU and a VM holding one per vCPU: VMs
// of the default 2 vCPUs run one at a time on a 2-core host, 1-vCPU VMs
// (Options.CPUs = 1) two at a time.
package vmtest
