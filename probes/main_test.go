package probes

import (
	"os"
	"testing"

	"github.com/clovisor/clovisor/internal/testbed"
)

func TestMain(m *testing.M) {
	testbed.ExecProbedMain() // when run as the exec wrapper (gotls_test.go)
	os.Exit(m.Run())
}
