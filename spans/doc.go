// Package spans turns the exchanges Clovisor observes (Session) into
// OpenTelemetry spans and sends them to one of three outputs:
//
//   - "otlp": the OpenTelemetry SDK's OTLP exporters (gRPC, HTTP/protobuf or
//     HTTP/JSON) behind one bounded BatchSpanProcessor. Endpoint, headers,
//     timeouts, compression and TLS come from the standard
//     OTEL_EXPORTER_OTLP_* environment variables, read by the SDK exporters
//     themselves; Config.Endpoint and Config.Protocol override them.
//   - "console": one compact human-readable line per span.
//   - "json": one JSON object per span per line.
//
// All three share the same span-building code: every Session becomes one
// finished span (an sdktrace.ReadOnlySpan built directly from the Session,
// since its times, attributes and IDs are all known when it arrives, without
// the SDK's TracerProvider and live spans), handed to the output's
// sdktrace.SpanExporter (synchronously for console and json, through the
// batch processor for otlp). The spans carry what the SDK's own spans would:
// the span limits of OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and
// OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT apply, and duplicate attribute keys
// keep their first position and last value.
//
// # Resources
//
// A span's resource describes the traced process, not the agent: service.name
// is the systemd unit the process runs in (/system.slice/nginx.service gives
// "nginx"), or else its executable name; a process in a container (a cgroup
// named cri-containerd-<id>.scope, docker-<id>.scope, crio-<id>.scope,
// libpod-<id>.scope or a bare 64-hex-digit cgroupfs directory) also gets
// container.id. host.name, host.id, telemetry.sdk.* and the attributes of
// OTEL_RESOURCE_ATTRIBUTES are added to every resource (service.name from the
// environment is ignored: it would name the agent). Every span names its own
// resource; the Exporter keeps the resources of recent services in a bounded
// LRU cache (Config.MaxResources), so that the spans of one service share one
// *resource.Resource. All spans go to one span processor and one
// SpanExporter, so the number of services costs neither goroutines nor
// queues.
//
// # Linking both ends of an exchange
//
// When Clovisor traces both the client and the server of one exchange, the
// SERVER span is made a child of the CLIENT span, in the same trace, without
// waiting for the other side and in whatever order the two arrive. Both
// spans derive the same IDs from what both ends of the connection see alike:
//
//	h = SHA-256("clovisor/link/v1" || transport || client ip:port ||
//	            server ip:port || Index || ConnTag)
//	trace ID       = h[0:16]
//	client span ID = h[16:24]
//
// (addresses unmapped from IPv4-mapped IPv6, so both ends hash the same
// bytes). The CLIENT span takes exactly these IDs; the SERVER span gets a
// random span ID and names (trace ID, client span ID) as its remote parent.
// A span takes part when Index >= 0, both addresses are known and
// Config.Link (if set) accepts the session; all other spans get random IDs.
//
// Wire sessions (seen by tc programs on a pod veth or a node NIC) take part
// the same way: their Kind is CLIENT when the end behind the interface (the
// pod, or the node) is the exchange's client and SERVER when it is the
// server, ConnTag is the same first request byte's sequence number (the
// wire saw the SYN or the SYN-ACK), and Index the same transaction's place
// on the connection. Each wire span, whatever its kind, is a child of the
// client's span, with a random span ID, like the SERVER span. In Jaeger a
// traced exchange between two pods shows as the client process's CLIENT
// span with three children: the client pod's veth (CLIENT, service the
// client's workload), the server pod's veth (SERVER, the server's workload)
// and the server process's SERVER span; each nests in time inside the
// client's span. (A chain client -> veth -> veth -> server would need the
// server's socket span to know whether, and where, the wire was traced.)
//
// Limits of the rule:
//   - Both ends must see the same address pair: NAT, proxies and Kubernetes
//     Service DNAT break it (the server then names a parent span that does not
//     exist, and the client span is a root of its own trace).
//   - Both ends must number the exchanges of the connection alike (Index) and
//     fill ConnTag alike (or leave it 0 on both).
//   - A server whose client is not traced names a parent span that is never
//     exported; use Config.Link to restrict linking to peers known to be
//     traced.
//   - Without ConnTag, a later connection reusing the same address pair (the
//     client's ephemeral port comes round again) produces the same IDs as an
//     earlier one: their spans share a trace ID.
//   - Clovisor cannot see trace context carried inside the application (a
//     server span of a process is not the parent of the client spans that
//     process makes while handling the request).
package spans
