package spans

import (
	"context"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/resource"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// service is what distinguishes the resources of traced processes.
type service struct {
	name        string
	containerID string
	k8s         *K8s // the Kubernetes identity, when an Enricher knows it
}

// exeName is the traced executable's name: Exe when user space read it,
// else the kernel's comm.
func exeName(p *Process) string {
	if p.Exe != "" {
		return p.Exe
	}
	return p.Comm
}

// serviceOf derives the service of a session's process from its cgroup path
// and executable (see the package doc).
func serviceOf(s *Session) service {
	if s.Wire != nil {
		return wireService(s)
	}
	unit, cid := parseCgroup(s.CgroupPath)
	sv := service{name: unit, containerID: cid}
	if sv.name == "" {
		sv.name = exeName(&s.Process)
	}
	if sv.name == "" {
		sv.name = "unknown_service"
	}
	return sv
}

// parseCgroup returns the systemd service unit named by the last element of a
// cgroup v2 path (without ".service"), and the innermost container ID found
// among its elements. It does not allocate.
func parseCgroup(path string) (unit, containerID string) {
	rest := path
	var last string
	for rest != "" {
		var el string
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			el, rest = rest[:i], rest[i+1:]
		} else {
			el, rest = rest, ""
		}
		if el == "" {
			continue
		}
		last = el
		if id := containerIDOf(el); id != "" {
			containerID = id
		}
	}
	if u, ok := strings.CutSuffix(last, ".service"); ok && u != "" {
		unit = u
	}
	return unit, containerID
}

// containerIDOf recognises one cgroup path element naming a container:
// "cri-containerd-<id>.scope", "docker-<id>.scope", "crio-<id>.scope",
// "libpod-<id>.scope" (systemd cgroup driver) or a bare "<id>" (cgroupfs
// driver), where <id> is 64 hexadecimal digits.
func containerIDOf(el string) string {
	if len(el) == 64 {
		if isHex(el) {
			return el
		}
		return ""
	}
	s, ok := strings.CutSuffix(el, ".scope")
	if !ok || len(s) < 64 {
		return ""
	}
	id := s[len(s)-64:]
	switch s[:len(s)-64] {
	case "cri-containerd-", "docker-", "crio-", "libpod-":
		if isHex(id) {
			return id
		}
	}
	return ""
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// baseResourceAttrs detects what every resource shares: telemetry.sdk.*,
// host.name, host.id and OTEL_RESOURCE_ATTRIBUTES (the latter taking
// precedence), without any service.name (that names the traced process). A
// detection error leaves out what could not be detected and is returned.
func baseResourceAttrs(ctx context.Context) ([]attribute.KeyValue, error) {
	r, err := resource.New(ctx,
		resource.WithTelemetrySDK(),
		resource.WithHost(),
		resource.WithHostID(),
		resource.WithFromEnv(),
	)
	if r == nil {
		return nil, err
	}
	attrs := make([]attribute.KeyValue, 0, r.Len())
	for it := r.Iter(); it.Next(); {
		if kv := it.Attribute(); kv.Key != semconv.ServiceNameKey {
			attrs = append(attrs, kv)
		}
	}
	return attrs, err
}

// newResource returns the resource of one service.
func newResource(base []attribute.KeyValue, sv service) *resource.Resource {
	attrs := make([]attribute.KeyValue, 0, len(base)+2)
	attrs = append(attrs, base...)
	attrs = append(attrs, semconv.ServiceName(sv.name))
	if sv.k8s != nil {
		attrs = k8sResourceAttrs(attrs, sv.k8s)
	}
	if sv.containerID != "" {
		attrs = append(attrs, semconv.ContainerID(sv.containerID))
	}
	return resource.NewWithAttributes(semconv.SchemaURL, attrs...)
}
