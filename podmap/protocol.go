package podmap

import "strings"

// Protocol names Clovisor's tables know (tcsessions.Protocols), as Istio's
// port-name convention spells them.
const (
	ProtoTCP  = "tcp"
	ProtoHTTP = "http"
)

// istioProtocols are the prefixes of the Istio port-name convention that
// Clovisor maps, longest first where one is the prefix of another
// (grpc-web before grpc).
var istioProtocols = []string{"grpc-web", "http2", "https", "http", "grpc", "tls", "tcp", "udp", "mongo", "mysql", "redis", "memcached"}

// PortProtocol returns the protocol of a Service or container port from its
// appProtocol (when set) or its name, by the Istio convention
// "<protocol>[-<suffix>]" (http, http-web, grpc-web-api, tcp-db, ...).
// It returns "" when neither names a protocol Clovisor knows: the port is
// then traced as TCP and payload detection decides.
func PortProtocol(name string, appProtocol *string) string {
	if appProtocol != nil {
		if p := fromAppProtocol(*appProtocol); p != "" {
			return p
		}
	}
	n := strings.ToLower(name)
	for _, p := range istioProtocols {
		if n == p || strings.HasPrefix(n, p+"-") {
			return p
		}
	}
	return ""
}

// fromAppProtocol maps a Service port's appProtocol: the IANA service names
// and the kubernetes.io/ ones (h2c, ws, wss) of the Kubernetes API
// documentation, or a bare protocol name.
func fromAppProtocol(ap string) string {
	switch strings.ToLower(ap) {
	case "kubernetes.io/h2c", "h2c":
		return "http2"
	case "kubernetes.io/ws", "ws":
		return "http"
	case "kubernetes.io/wss", "wss":
		return "https"
	case "http", "http-alt", "www":
		return "http"
	case "http2", "h2":
		return "http2"
	case "https":
		return "https"
	case "grpc":
		return "grpc"
	case "grpc-web":
		return "grpc-web"
	case "tls":
		return "tls"
	case "tcp":
		return "tcp"
	case "redis":
		return "redis"
	case "mongo", "mongodb":
		return "mongo"
	case "mysql":
		return "mysql"
	case "memcache", "memcached":
		return "memcached"
	}
	return ""
}
