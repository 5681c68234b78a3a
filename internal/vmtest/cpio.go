package vmtest

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
)

// Mode bits of the cpio "newc" format (the same as st_mode).
const (
	cpioDir     = 0o040000
	cpioRegular = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

// cpioWriter writes an archive in the SVR4 "newc" format without CRC
// (magic 070701), the one the kernel unpacks as initramfs. Entries are
// owned by root; parent directories are added automatically (the kernel
// does not create them), each once per archive.
type cpioWriter struct {
	w    io.Writer
	ino  uint32
	dirs map[string]bool
	err  error
}

func newCpioWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1000, dirs: map[string]bool{".": true, "/": true, "": true}}
}

// cleanName turns a guest path into an archive name: relative, cleaned.
func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// entry writes one header, its name and its data, each padded to 4 bytes.
func (c *cpioWriter) entry(name string, mode uint32, nlink uint32, rdevMajor, rdevMinor uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8+len(data)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, data...)
	buf = pad4(buf)
	_, c.err = c.w.Write(buf)
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// parents adds the missing parent directories of name.
func (c *cpioWriter) parents(name string) {
	dir := path.Dir(name)
	if c.dirs[dir] {
		return
	}
	c.parents(dir)
	c.dirs[dir] = true
	c.entry(dir, cpioDir|0o755, 2, 0, 0, nil)
}

// Dir adds a directory (and its parents) with permissions perm.
func (c *cpioWriter) Dir(name string, perm fs.FileMode) {
	name = cleanName(name)
	if c.dirs[name] {
		return
	}
	c.parents(name)
	c.dirs[name] = true
	c.entry(name, cpioDir|uint32(perm.Perm()), 2, 0, 0, nil)
}

// File adds a regular file with the given contents and permissions.
func (c *cpioWriter) File(name string, data []byte, perm fs.FileMode) {
	name = cleanName(name)
	c.parents(name)
	c.entry(name, cpioRegular|uint32(perm.Perm()), 1, 0, 0, data)
}

// HostFile adds the host file src as name, keeping its permission bits.
func (c *cpioWriter) HostFile(name, src string) {
	if c.err != nil {
		return
	}
	st, err := os.Stat(src)
	if err != nil {
		c.err = err
		return
	}
	if !st.Mode().IsRegular() {
		c.err = fmt.Errorf("%s is not a regular file", src)
		return
	}
	data, err := os.ReadFile(src)
	if err != nil {
		c.err = err
		return
	}
	c.File(name, data, st.Mode().Perm())
}

// Symlink adds a symbolic link name -> target.
func (c *cpioWriter) Symlink(name, target string) {
	name = cleanName(name)
	c.parents(name)
	c.entry(name, cpioSymlink|0o777, 1, 0, 0, []byte(target))
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) {
	name = cleanName(name)
	c.parents(name)
	c.entry(name, cpioCharDev|uint32(perm.Perm()), 1, major, minor, nil)
}

// Close writes the trailer and returns the first error met.
func (c *cpioWriter) Close() error {
	c.entry("TRAILER!!!", 0, 1, 0, 0, nil)
	return c.err
}
