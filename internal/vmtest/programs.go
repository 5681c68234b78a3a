package vmtest

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// Host programs in the guest (Options.Programs).
//
// A program is copied into the initramfs at its host path, together with
// every shared library it loads (as `ldd` lists them: DT_NEEDED entries,
// transitively, resolved the way the host's dynamic loader does) and the
// dynamic loader itself (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2), each
// at the path the loader looks for it, with its chain of symbolic links
// (the program itself is copied as a regular file). The guest has no
// ld.so.cache: the loader finds the libraries in its built-in system
// directories (/lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib,
// /usr/lib), which is where ldd finds them on a Debian host; a library
// elsewhere (found through /etc/ld.so.conf.d) is an error.
//
// The guest's own directory links are kept: /sbin, /usr/bin and /usr/sbin
// are links to /bin (busybox's applets), and /var/run to /run, so a host
// program at /usr/sbin/nginx is stored as /bin/nginx and reached at both
// paths. It replaces a busybox applet of the same name in /bin (iproute2's
// ip replaces busybox's), which is what exec from Go, bash or ip itself
// finds in PATH; busybox sh, a "standalone shell", still runs its own
// applet for a bare name, so guest shell scripts call such a program by
// its path (/usr/sbin/ip).
//
// Libraries loaded with dlopen (NSS modules, gconv, plugins) are not found
// this way; glibc 2.34+ has the "files" NSS service built in, so passwd and
// group lookups work without them. Data files a program reads (nginx's
// mime.types, say) are the caller's business: add them with Options.Files.

// guestDirLinks are the directory symlinks of the base archive (guest path
// -> target), which per-run files must not replace with directories.
var guestDirLinks = []struct{ dir, target string }{
	{"/sbin", "bin"},
	{"/usr/bin", "../bin"},
	{"/usr/sbin", "../bin"},
	{"/var/run", "../run"},
}

// guestPath rewrites a guest path through the base archive's directory
// links (/usr/sbin/nginx -> /bin/nginx), so that writing it in a later
// archive neither turns a link into a directory nor misses the link.
func guestPath(p string) string {
	p = filepath.Clean("/" + p)
	for _, l := range guestDirLinks {
		if rest, ok := strings.CutPrefix(p, l.dir+"/"); ok {
			return guestPath(filepath.Join(filepath.Dir(l.dir), l.target, rest))
		}
	}
	return p
}

// lookProgram returns the host path of a program: p itself if it holds a
// slash (made absolute), else its place in PATH.
func lookProgram(p string) (string, error) {
	if strings.Contains(p, "/") {
		abs, err := filepath.Abs(p)
		if err != nil {
			return "", err
		}
		if _, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("program %s: %w", p, err)
		}
		return abs, nil
	}
	found, err := exec.LookPath(p)
	if err != nil {
		return "", fmt.Errorf("program %q for the guest: %w", p, err)
	}
	return filepath.Abs(found)
}

// guestFile is one entry of the programs archive: a copy of a host file,
// or a symbolic link.
type guestFile struct {
	host string // host file to copy (symlinks followed), or ""
	link string // symlink target, when host is ""
}

// programFiles resolves programs (host paths or names in PATH) to the files
// the guest needs, by guest path (see guestPath). A program is copied to its
// path. A library or the loader keeps its chain of symbolic links in its
// directory, as on the host (/lib64/ld-linux-x86-64.so.2 -> ..., libbpf.so.1
// -> libbpf.so.1.1.2: some programs read versions from the file names).
func programFiles(programs []string) (map[string]guestFile, error) {
	files := map[string]guestFile{}
	for _, p := range programs {
		host, err := lookProgram(p)
		if err != nil {
			return nil, err
		}
		files[guestPath(host)] = guestFile{host: host}
		libs, err := sharedLibraries(host)
		if err != nil {
			return nil, err
		}
		for _, l := range libs {
			if err := addLibrary(files, l); err != nil {
				return nil, err
			}
		}
	}
	return files, nil
}

// addLibrary adds the library at path p: each symbolic link of the path's
// last component as a link, the file it ends at as a copy.
func addLibrary(files map[string]guestFile, p string) error {
	for range 40 {
		g := guestPath(p)
		if _, ok := files[g]; ok {
			return nil
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if st.Mode()&os.ModeSymlink == 0 {
			files[g] = guestFile{host: p}
			return nil
		}
		target, err := os.Readlink(p)
		if err != nil {
			return err
		}
		next := target
		if !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(p), target)
		}
		if guestPath(next) == g {
			// A link the guest's own directory links make (the host's
			// /usr/sbin/ip -> /bin/ip is /bin/ip in the guest): copy.
			files[g] = guestFile{host: p}
			return nil
		}
		files[g] = guestFile{link: target}
		p = next
	}
	return fmt.Errorf("%s: too many levels of symbolic links", p)
}

// sharedLibraries returns the absolute paths of the shared objects the ELF
// executable at p needs to start, the dynamic loader included; none for a
// static executable or a file that is not ELF.
func sharedLibraries(p string) ([]string, error) {
	f, err := elf.Open(p)
	if err != nil {
		return nil, nil // a script or data: nothing to load
	}
	interp := ""
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			b := make([]byte, prog.Filesz)
			if _, err := prog.ReadAt(b, 0); err != nil {
				f.Close()
				return nil, fmt.Errorf("%s: reading PT_INTERP: %w", p, err)
			}
			interp = string(bytes.TrimRight(b, "\x00"))
		}
	}
	f.Close()
	if interp == "" {
		return nil, nil // static
	}
	ldd, err := exec.LookPath("ldd")
	if err != nil {
		return nil, fmt.Errorf("%s is dynamically linked and ldd is missing (libc-bin): %w", p, err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(ldd, p)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %v: %s", p, err, stderr.String())
	}
	libs, err := parseLdd(string(out))
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", p, err)
	}
	for _, l := range libs {
		if l != interp && !inLoaderDirs(l) {
			return nil, fmt.Errorf("%s needs %s, outside the dynamic loader's default directories %v: the guest has no ld.so.cache to find it",
				p, l, loaderDirs)
		}
	}
	if !containsString(libs, interp) {
		libs = append(libs, interp)
	}
	return libs, nil
}

// loaderDirs are the directories where glibc's loader looks for libraries
// without ld.so.cache, on x86-64 Debian (and their glibc-hwcaps/<level>
// subdirectories).
var loaderDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib"}

func inLoaderDirs(p string) bool {
	for _, d := range loaderDirs {
		if filepath.Dir(p) == d || strings.HasPrefix(p, d+"/glibc-hwcaps/") {
			return true
		}
	}
	return false
}

// parseLdd reads ldd's listing: "name => /path (0x...)" for a library found,
// "/path (0x...)" for the loader, "name (0x...)" for the vDSO (no file),
// "name => not found" for a missing one (an error).
func parseLdd(out string) ([]string, error) {
	var libs []string
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.Contains(line, "statically linked") {
			continue
		}
		name, target, arrow := strings.Cut(line, " => ")
		if arrow {
			if strings.HasPrefix(target, "not found") {
				return nil, fmt.Errorf("library %s not found", name)
			}
			line = target
		}
		path, _, _ := strings.Cut(line, " (")
		path = strings.TrimSpace(path)
		if !strings.HasPrefix(path, "/") {
			continue // linux-vdso.so.1: in the kernel, no file
		}
		libs = append(libs, path)
	}
	return libs, nil
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

var (
	programsMu    sync.Mutex
	programsCache = map[string][]byte{}
)

// programsArchive returns the cpio archive of programs and their libraries,
// built once per process for each list (the files are large: curl's
// libraries alone are about 10 MB).
func programsArchive(programs []string) ([]byte, error) {
	if len(programs) == 0 {
		return nil, nil
	}
	key := strings.Join(programs, "\x00")
	programsMu.Lock()
	defer programsMu.Unlock()
	if b, ok := programsCache[key]; ok {
		return b, nil
	}
	files, err := programFiles(programs)
	if err != nil {
		return nil, err
	}
	guests := make([]string, 0, len(files))
	for g := range files {
		guests = append(guests, g)
	}
	sort.Strings(guests)
	var buf bytes.Buffer
	c := newCpioWriter(&buf)
	for _, g := range guests {
		if f := files[g]; f.host != "" {
			c.HostFile(g, f.host) // follows host symlinks: a regular file
		} else {
			c.Symlink(g, f.link)
		}
	}
	if err := c.Close(); err != nil {
		return nil, err
	}
	programsCache[key] = buf.Bytes()
	return buf.Bytes(), nil
}
