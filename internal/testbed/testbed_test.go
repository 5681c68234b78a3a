package testbed

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// recorder is a testing.TB that records Skip and Fatalf instead of stopping.
type recorder struct {
	testing.TB
	skipped, failed bool
	msg             string
}

func (r *recorder) Helper() {}
func (r *recorder) Skip(args ...any) {
	r.skipped = true
	r.msg = fmt.Sprint(args...)
}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = true
	r.msg = fmt.Sprintf(format, args...)
}

func TestRequireToolSkipsOrFailsInCI(t *testing.T) {
	for _, ci := range []string{"", "true"} {
		t.Setenv("CI", ci)
		r := &recorder{TB: t}
		RequireTool(r, "clovisor-no-such-tool")
		if ci == "true" {
			if !r.failed || r.skipped || !strings.Contains(r.msg, "CI=true") {
				t.Errorf("CI=true: failed=%v skipped=%v msg=%q; want a failure", r.failed, r.skipped, r.msg)
			}
		} else if !r.skipped || r.failed || !strings.Contains(r.msg, "clovisor-no-such-tool") {
			t.Errorf("CI unset: failed=%v skipped=%v msg=%q; want a skip naming the tool", r.failed, r.skipped, r.msg)
		}
	}
	r := &recorder{TB: t}
	if p := RequireTool(r, "sh"); p == "" || r.failed || r.skipped {
		t.Errorf("RequireTool(sh) = %q (failed=%v skipped=%v)", p, r.failed, r.skipped)
	}
}

func TestRequireRoot(t *testing.T) {
	t.Setenv("CI", "")
	eff, err := effectiveCaps()
	if err != nil {
		t.Fatal(err)
	}
	const need = 1<<capSysAdmin | 1<<capBPF | 1<<capNetAdmin
	privileged := os.Geteuid() == 0 && eff&need == need
	r := &recorder{TB: t}
	RequireRoot(r)
	if r.failed || r.skipped == privileged {
		t.Errorf("RequireRoot (euid %d, CapEff %#x): skipped=%v failed=%v %q", os.Geteuid(), eff, r.skipped, r.failed, r.msg)
	}
}

func TestRepoRoot(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "scripts", "jaeger.sh")); err != nil {
		t.Errorf("RepoRoot() = %s, which has no scripts/jaeger.sh: %v", root, err)
	}
}
