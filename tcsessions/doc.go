// Package tcsessions traces TCP sessions on the wire: tc programs (bpf/tc.c)
// on the host side of pod veths and on the node's NICs follow every traced
// connection packet by packet and report one record per request/response
// exchange, with its L3/L4 facts and, where the wire is plaintext, its L7
// transaction read by the same analyzers the socket tracer uses.
//
// # Attaching
//
// Open loads the programs and attaches them to the ingress and the egress
// hook of each selected interface: with tcx links (Linux 6.6+), first
// in each chain, or as cls_bpf filters in direct-action mode under a clsact
// qdisc (made when the interface has none). Config.Attach forces either; in
// auto mode the first attach decides. The programs never change, redirect
// or drop a packet: they return TC_ACT_UNSPEC / TCX_NEXT.
//
// The programs come in two builds of the same source (bpf/tc.h). In tc,
// the rare paths (opening a session, making a record, capturing a prefix,
// IPv6 extension headers, workload counts, error counters) are BPF
// subprograms, out of line, so that the code every packet runs is about a
// third of the program's image and takes fewer lines of the instruction
// cache. Verifiers before Linux 6.4 cannot follow precision across
// BPF-to-BPF calls and take minutes over such a program, so those kernels
// get tcInline, the same code with every function inlined
// (inlineKernel; TestProgramVariant checks the choice on 6.1, 6.12 and
// the host).
//
// tc is one program, clv_tc, on both hooks: a packet that crosses two
// traced interfaces (from one pod to another) runs the same code twice,
// and the second run finds it in the instruction cache. The hook matters
// only when a connection's entry is made (which end is the client inside
// the interface): the program reads it then from the sk_buff
// (bpf_cast_to_kern_ctx, tc_at_ingress). tcInline has a program for each
// hook, clv_tc_ingress and clv_tc_egress, which know theirs; a kernel
// without BTF, which tc needs for that read, gets tcInline too
// (inlineVariant).
//
// Interfaces are selected by name, shell pattern or selector: every veth
// whose peer lives in another network namespace (SelectHostVeths: the host
// side of a pod's veth) as a pod veth, and the interfaces of the default
// routes (SelectDefaultRoute) as node NICs, by default. Interfaces that
// appear later are attached as they come (a netlink link subscription);
// those removed are forgotten. Config.Netns makes the tracer work in
// another network namespace (the tests use it to play a node).
//
// # Tables
//
//   - dports2proto: server port (on one interface or every one) to
//     protocol id (Protocols; "ignore" never traces).
//   - egress_lookup_table: LPM trie of server prefix + port (0: any) to
//     protocol id, for connections to peers outside the node.
//   - port_marks: a bit per port that either table names with a protocol
//     (port 0: an egress match of any port). A TCP packet neither of whose
//     ports is marked is passed on after its headers are read, without the
//     sessions lookup or the table lookups (unless TrackAll). Bits are only
//     set: a port removed from the tables stays marked, so its connections
//     already traced go on to their end.
//   - sessions: LRU hash of Config.MaxSessions connections, one per
//     interface and 5-tuple in canonical order (IPv4 as IPv4-mapped IPv6).
//     Its key is a seeded 64-bit fingerprint of the interface and tuple,
//     and each entry holds the tuple itself, which every lookup compares:
//     hashing 8 bytes instead of 40 makes the lookup that every traced
//     packet pays cheaper. A connection whose fingerprint another
//     connection's entry holds (a chance of about 2^-64 per pair, seed
//     random per load) is not traced and counted (Stats.KeyCollisions).
//     Each entry holds the connection's counters and current exchange,
//     laid out so that a table element (header and entry, 384 bytes) is
//     six whole cache lines and a packet touches three of them: the
//     element's header with the exchange state, the key line, and its
//     direction's counters (TestSessionElementLayout checks the kernel's
//     element header against it).
//   - ifaces, ifaces_high: what to do on each interface (sessions;
//     workload counts), by ifindex: an array for indexes below 32768
//     (every packet looks its interface up; an array lookup is inlined),
//     a hash for higher ones.
//   - workload_ips, workload_traffic: IP address to workload slot, and
//     per-CPU bytes and packets in and out per workload, counted on node
//     NICs (Tracer.WorkloadTraffic). The workloads are those at the other
//     end of the pod veths, found with no configuration (see Workloads
//     below), and those given with Tracer.SetWorkload, which win.
//   - tc_stats: per-CPU counters of everything lost or skipped (Stats).
//
// With no port and no egress match configured every TCP connection is
// traced (Config.TrackAll).
//
// # Sessions and exchanges
//
// A connection opens on its client's SYN when the server (address, port)
// is in a table, on the server's SYN-ACK likewise, or, for connections
// already open, on its first payload packet (the table tells the roles; with
// TrackAll and no match the lower port is taken for the server, and the
// record says so). Pure ACKs, FINs and RSTs of unknown connections open
// nothing.
//
// An exchange runs from the first new request payload to the next new
// request payload after response payload (keep-alive: one record per
// exchange, Index 0, 1, ...), or to the close: both FINs seen, a RST, or a
// new SYN on the same tuple. Its record holds the kernel timestamps of the
// first and last packet with new payload of each direction, the client's
// first SYN and the server's first SYN-ACK on this interface (the
// handshake's round trip, with the wait of any retransmitted SYN), and per
// direction: IP bytes and wire packets (GSO/GRO packets count
// as their segments, each with its headers), TCP payload bytes, new bytes
// (how far the highest sequence advanced: exact whatever is retransmitted
// or reordered), packets carrying old data, and the TCP flags seen. The
// handshake's packets count in exchange 0; the ACK after both FINs is not
// counted. The connection also records which hook its client's packets
// cross (ConnClientIngress) and the sequence number of the client's first
// byte (from the SYN, or the SYN-ACK's acknowledgement: ReqSeq0).
//
// The timestamps are CLOCK_MONOTONIC nanoseconds. A packet that a TCP
// stack of this node sent (a pod's, the node's own) carries its departure
// time (skb->tstamp, marked monotonic: the time the stack sent it, or,
// behind a pacing qdisc, the time it may leave), which the kernel keeps
// across veths, bridges and forwarding; that time is the packet's, and it
// spares the programs a clock read. A packet from another machine carries
// none, and takes the time the program ran. The two differ by the time a
// packet takes from its sender's TCP stack to the hook: microseconds on a
// node's veths, more behind a queue in the pod. tcInline (kernels before
// 6.4) always reads the clock.
//
// The first new payload of each direction of each exchange sends a prefix
// to user space (Config.PayloadBytes for requests, 1024 by default;
// Config.ResponsePayloadBytes for responses, 512: an HTTP parser needs the
// status line and headers, the body is stepped over by its length). On a
// connection whose request began with an HTTP/1.x method, every later
// packet of an exchange that begins a request line or a status line is
// captured too (a "mark", at most 64 per direction and exchange, Stats.
// MarkLimit beyond), with the exchange's counts before it: that is how
// pipelined requests are told apart.
//
// # From records to transactions
//
// The Assembler follows each connection (a bounded LRU of
// AssemblerConfig.MaxConns): one parser per connection reads the captured
// prefixes in stream order as they arrive, the bytes not captured between
// and after them fed as gaps of known length (so bodies are stepped over),
// and the transactions it completes wait for the record of their wire
// exchange. A record cuts its exchange's counts into pieces at its
// captured packets; each piece counts for the transaction whose message
// holds its first new byte (a piece without new bytes, pure ACKs, for the
// transaction in progress), so that the transactions' counts add up to the
// wire's exactly. Every transaction is one Exchange, Index numbered on from
// the wire's exchange index; all but the last of a wire exchange end
// "pipelined". Without pipelining a transaction is exactly its wire
// exchange, with its times. Connections no analyzer recognises (TLS, for
// one) give one Exchange per wire exchange with the L3/L4 facts and the
// prefixes.
//
// What the wire cannot separate, with only prefixes of the packets that
// begin a direction or a message: a message that begins inside a packet
// is read only when that packet was captured and the message starts within
// its prefix (two small requests in one segment are; a response that a
// server appended to the last segment of a long previous response, as
// nginx does under backpressure, is not: its transaction is reported
// truncated, without status, and later responses of that packet are not
// told apart). A packet's counts go wholly to the transaction its first new
// byte belongs to: of two requests in one packet, the second shows no
// request packets (its L7 sizes, Tx.ReqBytes, are exact all the same).
// Flags are those of the whole wire exchange.
//
// A transaction spanning wire exchanges (a pipelined request that arrives
// while the previous response is still on the wire ends the kernel's
// exchange) is reported with the record that completes it, with the
// pieces of both.
//
// # Spans
//
// Exchange.Session makes each transaction a span's session: CLIENT when
// the end behind the interface (the pod of a pod veth, the node on a NIC)
// is the client, SERVER when it serves; with the first request byte's
// sequence number (ConnTag) and the transaction's index, like the socket
// tracer's sessions, so that the spans package puts it in the same trace,
// a child of the client's socket span; its service is the workload of the
// end behind the interface.
//
// # Workloads
//
// Each pod veth's workload is named with no configuration (peers.go): the
// veth's peer is found by its link-netnsid among the namespaces named in
// /run/netns and those of processes; the workload is the namespace's name,
// else the container ID (first 12 hex digits) or the cgroup of its oldest
// process, else the veth's name; its addresses are the peer interface's
// global unicast ones, read again every Config.WorkloadRefresh (2 s) and
// when a pod veth comes. Node NICs then count every pod's bytes and
// packets in and out, and wire spans name their service.
//
// The packets of one connection run on several CPUs at once. Counters are
// only ever added to atomically; an exchange's counts are the difference of
// the totals at its end and its start, so the records of a connection add
// up to its totals exactly; the exchange state changes by
// compare-and-exchange, so one CPU ends each exchange; the highest sequence
// rises by an atomic maximum.
//
// IPv4 options and IPv6 extension headers (hop-by-hop, routing,
// destination options, AH, fragment; up to six) are stepped over. The first
// fragment of a TCP segment counts with its own bytes; later fragments have
// no L4 header: they count for workloads and in Stats.Fragments only.
//
// A keep-alive connection's last exchange would wait for the next request
// or the close; Run reports it once idle for Config.IdleFlush, from the
// sessions table (End EndIdle), and drops the kernel's later record of it.
//
// # Clean-up
//
// Every tcx link, filter and qdisc made is recorded and removed in reverse
// order by Close. A clsact qdisc is removed only when Clovisor made it (the
// state file in Config.StateDir says so) and no filter is left on it. At
// start, what an earlier instance left (after SIGKILL) is removed: tcx
// links pinned in Config.PinDir (links are pinned only when it is set;
// otherwise they die with the process), Clovisor's cls_bpf filters
// (FilterHandle and a name starting with FilterNamePrefix) on every
// interface, and the qdiscs the state file names once empty. Other tools'
// qdiscs, filters and tcx programs are never touched. Cleanup does the same
// without attaching.
//
// # Cost
//
// Measured on the build machine (Linux 6.18, 2 vCPUs, shared; see
// docs/benchmarks.md): about 9 ns per packet on an interface that is not
// traced, 60-150 ns per packet in BenchmarkProgram (BPF_PROG_TEST_RUN,
// warm), 250-370 ns per program run on real traffic (cache misses and
// cross-CPU atomics included). A keep-alive HTTP exchange between two
// traced pods runs the programs 8 times (request, response and ACKs on two
// veths): 2.4-3.0 µs of BPF time, and 5-7 µs of the reader's CPU for its two
// records and four prefixes (BenchmarkAssembler: 1.5-1.9 µs per exchange
// for decoding, parsing and reporting alone). A bulk TCP stream costs
// 9-19 µs of BPF time per MB.
package tcsessions
