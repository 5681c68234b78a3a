/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Wire-level session tracing with tc programs (tcx or cls_bpf): the
 * programs of bpf/tc.c. A packet's direction within its connection comes
 * from the connection's roles (client -> server is the request direction),
 * not from the hook; the hook matters only when a connection's entry is
 * made (CONN_CLIENT_INGRESS).
 *
 * The programs never change, redirect or drop a packet: they always return
 * TC_PASS (TC_ACT_UNSPEC for cls_bpf, TCX_NEXT for tcx: both -1).
 *
 * Tables (Clovisor's, from the original design):
 *   dports2proto         user -> kernel: server port (per interface or on
 *                        every interface) -> protocol id
 *   egress_lookup_table  user -> kernel: server address prefix + port (LPM
 *                        trie) -> protocol id, for connections to peers
 *                        outside the node
 *   port_marks           user -> kernel: the ports the two tables name, so
 *                        packets of untraced ports skip every lookup
 *   sessions             kernel: one entry per TCP connection per
 *                        interface (bounded LRU), keyed by the 5-tuple in
 *                        canonical order plus the interface
 * and, for node interfaces, workload_ips / workload_traffic (bytes and
 * packets per local workload, attributed by IP address).
 *
 * Kernel -> user space contract (bpf2go generates the Go types):
 *   struct exchange_event  one request/response exchange of a connection,
 *                          with its timestamps and per-direction counters
 *   struct payload_event   a bounded prefix of the first new payload of one
 *                          direction of one exchange ("mark" 0), and, on
 *                          connections that speak HTTP/1.x, of each later
 *                          packet of the exchange that begins an HTTP
 *                          message (marks 1, 2, ...: pipelining), with the
 *                          exchange's counts before that packet
 *
 * Concurrency: the packets of one connection may run on several CPUs at
 * once (the two directions usually do). Counters are only ever added to
 * atomically and never reset; an exchange's counts are the difference
 * between the totals when it ended and when it began (base), so no packet
 * is lost or counted twice, and the exchanges of a connection add up to its
 * totals exactly. The exchange state (index and phase) changes only by
 * compare-and-exchange, so exactly one CPU ends each exchange.
 */
#ifndef CLOVISOR_TC_H
#define CLOVISOR_TC_H

#include "vmlinux.h"
#include "bpf_helpers.h"
#include "bpf_endian.h"
#include "bpf_core_read.h"

/*
 * CLV_COLD marks the functions that run at most a few times per connection
 * or only on rare paths (opening a session, making a record, capturing a
 * prefix, IPv6 extension headers, workload counts, error counters). They are
 * BPF subprograms, out of line, so that the code every packet runs is short
 * and contiguous and takes fewer lines of the instruction cache, which a
 * packet's trip through the stack empties between two runs. Verifiers before
 * Linux 6.4 cannot track precision across BPF-to-BPF calls and take minutes
 * over such a program: the object built with CLV_INLINE_ALL (tcInline, which
 * user space loads on those kernels) inlines them all.
 */
#ifdef CLV_INLINE_ALL
#define CLV_COLD __always_inline
#else
#define CLV_COLD __noinline
#endif

/* The hook a program runs at: known when it is built (tcInline: a program
 * for each hook), or asked of the kernel when a connection's entry is made
 * (tc: one program on both hooks). */
#define HOOK_EGRESS 0
#define HOOK_INGRESS 1
#define HOOK_ASK 2

/* TC_ACT_UNSPEC (cls_bpf) and TCX_NEXT (tcx): let the packet go on. */
#define TC_PASS (-1)

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60
/* How many IPv6 extension headers are stepped over before giving up. */
#define MAX_IPV6_EXT 6

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10

/* Largest payload prefix an event can carry; the configured prefix
 * (payload_cap) is at most this. */
#define MAX_PREFIX 4096
/* Masks a length to the scratch buffer (data + spill, 2 * MAX_PREFIX). */
#define PREFIX_MASK (2 * MAX_PREFIX - 1)

/* Most workloads whose traffic is counted (indexes into workload_traffic). */
#define MAX_WORKLOADS 4096

/* Most message-start packets captured per direction of one exchange beyond
 * its first payload (pipelined HTTP requests or responses). */
#define MAX_MARKS 64

enum tc_event_kind {
	TC_EVENT_EXCHANGE = 1,
	TC_EVENT_PAYLOAD = 2,
};

/* Direction of a packet within its connection. */
enum tc_dir {
	TC_DIR_REQUEST = 0,  /* client -> server */
	TC_DIR_RESPONSE = 1, /* server -> client */
};

/* How far an exchange got: no payload yet, request payload seen, response
 * payload seen. */
enum tc_phase {
	PHASE_IDLE = 0,
	PHASE_REQUEST = 1,
	PHASE_RESPONSE = 2,
};

/* Why an exchange record was made. */
enum exchange_end {
	END_NEXT_REQUEST = 1, /* request payload after response payload: keep-alive */
	END_FIN = 2,          /* both sides sent FIN */
	END_RST = 3,          /* a RST */
	END_REUSED = 4,       /* a new SYN on the same 5-tuple */
};

/* session.conn_flags and exchange_event.conn_flags */
enum conn_flag {
	CONN_FIN_REQUEST = 1 << 0,  /* the client sent FIN */
	CONN_FIN_RESPONSE = 1 << 1, /* the server sent FIN */
	CONN_CLOSED = 1 << 2,       /* the final record was made */
	CONN_HIGH_REQUEST = 1 << 3, /* dir[TC_DIR_REQUEST].high_end is set */
	CONN_HIGH_RESPONSE = 1 << 4,
	CONN_FROM_SYN = 1 << 5,      /* first seen: the client's SYN */
	CONN_FROM_SYNACK = 1 << 6,   /* first seen: the server's SYN-ACK */
	CONN_FROM_MIDSTREAM = 1 << 7,/* first seen: a payload packet */
	CONN_ROLES_GUESSED = 1 << 8, /* midstream, no table matched: the lower port is the server */
	CONN_CLIENT_INGRESS = 1 << 9,/* the client's packets cross the ingress hook (a pod veth's
				      * host side: the pod is the client; a NIC: the peer is) */
	CONN_SEQ0 = 1 << 10,         /* req_seq0 is known (the SYN or the SYN-ACK was seen) */
	CONN_HTTP = 1 << 11,         /* a request began with an HTTP/1.x method: later packets
				      * that begin a message are captured too (marks) */
};

/* ifaces values: what the programs do on an interface. */
enum iface_flag {
	IFACE_SESSIONS = 1 << 0,  /* track TCP sessions */
	IFACE_WORKLOADS = 1 << 1, /* count bytes and packets per local workload */
};

/* dports2proto / egress_lookup_table value that means "never track". */
#define PROTO_IGNORE 0xffff

/* Index into the stats map: counters user space reads and exports. */
enum tc_stat_index {
	TC_STAT_EXCHANGE_LOST = 0,  /* exchange records the ring buffer had no room for */
	TC_STAT_PAYLOAD_LOST = 1,   /* payload prefixes the ring buffer had no room for */
	TC_STAT_PAYLOAD_FAULT = 2,  /* payload prefixes that could not be read from the packet */
	TC_STAT_HEADER_FAULT = 3,   /* IP packets whose headers could not be read or made no sense */
	TC_STAT_FRAGMENTS = 4,      /* non-first fragments of TCP/other packets: no L4 header, no session */
	TC_STAT_EXT_HDR_LIMIT = 5,  /* IPv6 packets with more extension headers than followed */
	TC_STAT_SESSION_CREATED = 6,/* sessions entries made */
	TC_STAT_SESSION_CLOSED = 7, /* sessions entries removed on FIN/RST/reuse */
	TC_STAT_SESSION_FULL = 8,   /* sessions entries that could not be made */
	TC_STAT_STATE_RACE = 9,     /* exchange transitions lost to a concurrent one twice */
	TC_STAT_MARK_LIMIT = 10,    /* message starts not captured: MAX_MARKS reached in one exchange */
	TC_STAT_KEY_COLLISION = 11, /* packets of a connection whose fingerprint another connection's entry holds */
	TC_STAT_MAX = 16,
};

/* A TCP connection on one interface, endpoints in canonical order: lo is the
 * (address, port) pair that compares lower (addresses as two native u64,
 * then port), so both directions of a connection give the same key.
 * Addresses are 16 bytes, IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d). */
struct flow_key {
	__u8 addr_lo[16];
	__u8 addr_hi[16];
	__u16 port_lo; /* host byte order */
	__u16 port_hi;
	__u32 ifindex;
};

/* An exchange's or a connection's counts in one direction. */
struct dir_counters {
	__u64 bytes;           /* IP bytes; a GSO/GRO packet counts its headers once per segment */
	__u64 packets;         /* wire packets: GSO/GRO segments */
	__u64 payload_bytes;   /* TCP payload bytes, retransmissions included */
	__u64 new_bytes;       /* how far the highest sequence advanced: the stream's bytes */
	__u64 retrans_packets; /* packets with payload at or below the highest sequence seen:
				* retransmissions, or packets reordered (between CPUs, too) */
};

/*
 * The sessions table's entries are laid out for the cache lines a packet
 * touches. The table is a preallocated hash map: its elements sit one after
 * the other, each a header (56 bytes with the 8-byte key: the bucket's
 * list, the LRU's node, the hash, the key) followed by the value, struct
 * session. At 56 + 328 = 384 bytes an element is six whole cache lines, so
 * every element begins a line, and the fields land on lines as follows:
 *
 *   line 0  the element's header, then state      (the lookup; every packet)
 *   line 1  the rest of the head and the key      (every packet reads it)
 *   line 2  the request direction's cold half     (exchange boundaries)
 *   line 3  the request direction's live half     (its every packet)
 *   line 4  the response direction's cold half
 *   line 5  the response direction's live half
 *
 * A packet reads lines 0 and 1 and writes the live line of its direction:
 * three lines, each of which no other CPU writes per packet (the two
 * directions of a connection usually run on two CPUs at once, and a line
 * one CPU writes and another reads moves between their caches every time).
 * A kernel whose element header has another size gets the same fields on
 * more lines: slower, not wrong.
 */
#define SESSION_ELEM_HEAD 56

/* One direction of a connection: 128 bytes, two lines. */
struct dir_state {
	/* Written when an exchange begins or ends (64 bytes). */
	struct dir_counters base; /* total when the current exchange began */
	__u64 first_ts;  /* the current exchange's first new payload, 0 if none yet */
	__u64 open_ts;   /* request: the client's (latest) SYN; response: the server's first
			  * SYN-ACK; 0 if not seen */
	__u32 marks;     /* message-start captures in the current exchange */
	__u32 _pad;
	/* Written by every packet of the direction (56 bytes, a line of its own). */
	struct dir_counters total; /* whole connection; only added to */
	__u64 last_ts;   /* the current exchange's last new payload */
	__u32 high_end;  /* the highest sequence seen (SYN + 1, or the end of the highest
			  * payload); only raised, by compare-and-exchange (CONN_HIGH_*) */
	__u32 flags;     /* TCP flags seen in the current exchange */
	__u64 _pad2;
};

struct session {
	/* Read by every packet, written rarely (72 bytes: the end of line 0
	 * and line 1). */
	__u64 state;      /* exchange index << 8 | enum tc_phase; changed by cmpxchg only */
	__u32 conn_flags; /* enum conn_flag */
	__u16 proto;      /* protocol id from the table that matched (0 if none) */
	__u8 client_is_lo;/* the client is flow_key's lo endpoint */
	__u8 _pad;
	struct flow_key key; /* the connection: the table's key is its fingerprint (flow_fp) */
	__u64 first_ts;   /* when the connection was first seen: with the tuple, its identity */
	__u32 req_seq0;   /* the sequence number of the client's first byte (CONN_SEQ0) */
	__u32 _pad1;
	struct dir_state dir[2]; /* by enum tc_dir */
};

/* The layout above, checked. */
#define SESSION_LINE(off) ((SESSION_ELEM_HEAD + (off)) / 64)
#define DIR_LIVE_START(d) (__builtin_offsetof(struct session, dir[d].total))
#define DIR_LIVE_END(d) (__builtin_offsetof(struct session, dir[d].flags) + sizeof(__u32))
_Static_assert((SESSION_ELEM_HEAD + sizeof(struct session)) % 64 == 0, "table elements are not whole lines");
_Static_assert(SESSION_LINE(__builtin_offsetof(struct session, first_ts) + 12) == 1, "the head is not on lines 0 and 1");
_Static_assert(SESSION_LINE(DIR_LIVE_START(0)) == 3 && SESSION_LINE(DIR_LIVE_END(0) - 1) == 3,
	       "the request direction's live fields are not on line 3");
_Static_assert(SESSION_LINE(DIR_LIVE_START(1)) == 5 && SESSION_LINE(DIR_LIVE_END(1) - 1) == 5,
	       "the response direction's live fields are not on line 5");

/* The connection of an event, in client/server order. */
struct conn_tuple {
	__u8 client_addr[16];
	__u8 server_addr[16];
	__u16 client_port;
	__u16 server_port;
	__u32 ifindex;
};

struct exchange_event {
	__u8 kind;  /* TC_EVENT_EXCHANGE */
	__u8 end;   /* enum exchange_end */
	__u8 phase; /* enum tc_phase the exchange reached */
	__u8 _pad0;
	__u16 proto;
	__u16 _pad1;
	struct conn_tuple tuple;
	__u32 index;      /* the exchange's place on the connection: 0, 1, ... */
	__u32 conn_flags; /* enum conn_flag */
	__u32 req_seq0;   /* the sequence number of the client's first byte (CONN_SEQ0) */
	__u32 _pad2;
	__u64 first_ts;   /* the connection's first_ts */
	__u64 syn_ts;
	__u64 synack_ts;
	__u64 req_first_ts;
	__u64 req_last_ts;
	__u64 resp_first_ts;
	__u64 resp_last_ts;
	__u64 end_ts;      /* when the record was made */
	__u32 flags[2];    /* TCP flags seen, by enum tc_dir */
	struct dir_counters dir[2];
};

struct payload_event {
	__u8 kind; /* TC_EVENT_PAYLOAD */
	__u8 dir;  /* enum tc_dir */
	__u16 cap; /* bytes of data that follow */
	__u32 index;
	struct conn_tuple tuple;
	__u64 first_ts; /* the connection's first_ts */
	__u64 ts;
	__u32 len;  /* the packet's new payload bytes */
	__u32 seq;  /* the TCP sequence number of the first new byte */
	__u16 mark;  /* 0: the exchange's first new payload in this direction; n > 0: the
		      * n-th later packet that begins a message */
	__u16 proto; /* the connection's protocol id (the table's) */
	__u32 _pad1;
	struct dir_counters at; /* this direction's counts in the exchange before this packet */
	__u64 peer_new_bytes;   /* the other direction's new bytes in the exchange so far */
	__u8 data[MAX_PREFIX];
};

/* Scratch space for a payload event: the buffer is twice the largest prefix
 * so the variable-length copy is provably in bounds. */
struct payload_scratch {
	struct payload_event ev;
	__u8 spill[MAX_PREFIX];
};

struct port_key {
	__u32 ifindex; /* 0: every interface */
	__u16 port;    /* host byte order */
	__u16 _pad;
};

/* LPM trie key: prefixlen covers port then addr, so a match needs the exact
 * port (0 for any port) and the address prefix. prefixlen = 16 + bits of
 * the 16-byte address (IPv4: 16 + 96 + prefix bits). */
struct egress_key {
	__u32 prefixlen;
	__u8 port[2]; /* network byte order */
	__u8 addr[16];
};

struct iface_cfg {
	__u32 flags; /* enum iface_flag */
};

struct addr16 {
	__u8 a[16];
};

struct workload_counters {
	__u64 rx_bytes;   /* IP packets addressed to the workload */
	__u64 rx_packets;
	__u64 tx_bytes;   /* IP packets from the workload */
	__u64 tx_packets;
};

/* Settings fixed at load time by user space. */
volatile const __u32 payload_cap = 1024;     /* payload prefix of the request direction */
volatile const __u32 payload_cap_resp = 512; /* payload prefix of the response direction */
volatile const __u8 track_all = 0;       /* track connections no table matches */
/* Events are written without waking the reader, which polls; only a ring
 * filled beyond this many bytes wakes it at once. */
volatile const __u64 wakeup_bytes = 1 << 20;
volatile const __u64 fp_seed = 0; /* random, set when the programs are loaded */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} tc_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TC_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct port_key);
	__type(value, __u32);
} dports2proto SEC(".maps");

/* Server ports any table names (a bit per port, 32 per entry): a packet
 * neither of whose ports is marked cannot belong to a traced connection
 * unless track_all is set, so it is passed on without the sessions lookup
 * and the table lookups. Bit 0 (port 0) is set by egress matches of any
 * port: then every packet takes the full path. User space only ever sets
 * bits: a port removed from the tables stays marked, so its connections
 * already traced go on. */
#define PORT_MARK_WORDS (65536 / 32)
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PORT_MARK_WORDS);
	__type(key, __u32);
	__type(value, __u32);
} port_marks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress_key);
	__type(value, __u32);
} egress_lookup_table SEC(".maps");

/* Sessions are keyed by a 64-bit fingerprint of their flow_key (flow_fp),
 * and each entry holds the whole key, which every lookup compares: the
 * table hashes 8 bytes instead of 40 on every packet. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, __u64);
	__type(value, struct session);
} sessions SEC(".maps");

/* What the programs do on an interface, by ifindex: an array for the
 * indexes below IFACES_ARRAY (a lookup the verifier inlines: every packet
 * of every attached interface makes it), a hash for the rare higher ones
 * (a node's ifindexes only grow as interfaces come and go). flags 0:
 * nothing. */
#define IFACES_ARRAY 32768
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IFACES_ARRAY);
	__type(key, __u32);
	__type(value, struct iface_cfg);
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct iface_cfg);
} ifaces_high SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct addr16);
	__type(value, __u32);
} workload_ips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_WORKLOADS);
	__type(key, __u32);
	__type(value, struct workload_counters);
} workload_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct payload_scratch);
} tc_scratch SEC(".maps");

/* An exchange record is built here and copied to the ring buffer: a
 * reservation held across the record's loop is more than older verifiers
 * (6.1) can follow. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exchange_event);
} exchange_scratch SEC(".maps");

/* A zeroed session, the template of new entries (too large for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct session);
} session_init SEC(".maps");

/* Force bpf2go to emit the Go types. */
const struct exchange_event *unused_exchange_event __attribute__((unused));
const struct payload_event *unused_payload_event __attribute__((unused));
const enum tc_event_kind *unused_tc_event_kind __attribute__((unused));
const enum tc_dir *unused_tc_dir __attribute__((unused));
const enum tc_phase *unused_tc_phase __attribute__((unused));
const enum exchange_end *unused_exchange_end __attribute__((unused));
const enum conn_flag *unused_conn_flag __attribute__((unused));
const enum iface_flag *unused_iface_flag __attribute__((unused));
const enum tc_stat_index *unused_tc_stat_index __attribute__((unused));

/* Out of line (see CLV_COLD): every call is on a rare path. */
static CLV_COLD void tc_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&tc_stats, &idx);
	if (v)
		*v += 1; /* per-CPU: no other writer */
}

static __always_inline __u64 tc_ringbuf_flags(void)
{
	return bpf_ringbuf_query(&tc_events, BPF_RB_AVAIL_DATA) >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* What parse_ip found out about a packet. */
struct pkt {
	struct addr16 saddr, daddr;
	__u32 l4_off;    /* offset of the L4 header from the start of the packet */
	__u32 ip_len;    /* IP bytes of this skb: headers and payload */
	__u32 l3_hlen;   /* IP header and extension headers */
	__u8 l4proto;    /* 0 when there is no L4 header to read */
	__u8 fragment;   /* a fragment (first or not) */
	__u8 later_fragment; /* a non-first fragment: no L4 header */
	__u8 _pad;
};

static __always_inline void map_v4(struct addr16 *dst, __u32 addr)
{
	__u64 *q = (__u64 *)dst->a;
	q[0] = 0;
	((__u32 *)dst->a)[2] = bpf_htonl(0x0000ffff);
	((__u32 *)dst->a)[3] = addr;
}

/* LOAD_HDR copies the header *dst from offset off of the packet: straight
 * from the skb's linear data when it holds the header (the usual case: a
 * typed copy, a few word loads), else with bpf_skb_load_bytes. It is 0 on
 * success. The offsets of headers are small; the bound lets every verifier
 * follow the variable offset. */
#define HDR_DIRECT_MAX 512
#define LOAD_HDR(skb, off, dst)                                                        \
	({                                                                             \
		int __ret = 1;                                                         \
		__u32 __off = (off);                                                   \
		if (__off <= HDR_DIRECT_MAX) {                                         \
			void *__data = (void *)(long)(skb)->data;                      \
			void *__end = (void *)(long)(skb)->data_end;                   \
			typeof(dst) __src = __data + __off;                            \
			if ((void *)(__src + 1) <= __end) {                            \
				*(dst) = *__src;                                       \
				__ret = 0;                                             \
			}                                                              \
		}                                                                      \
		if (__ret)                                                             \
			__ret = bpf_skb_load_bytes((skb), __off, (dst), sizeof(*(dst))); \
		__ret;                                                                 \
	})

/* parse_ip6 is parse_ip for an IPv6 packet: out of line (see CLV_COLD),
 * as its extension headers' loop is most of parse_ip's code. */
static CLV_COLD int parse_ip6(struct __sk_buff *skb, struct pkt *p)
{
	struct ipv6hdr ip6;
	if (LOAD_HDR(skb, ETH_HLEN, &ip6))
		goto fault;
	if (ip6.version != 6)
		goto fault;
	__u32 plen = bpf_ntohs(ip6.payload_len);
	if (plen == 0 && skb->len > ETH_HLEN + sizeof(ip6))
		plen = skb->len - ETH_HLEN - sizeof(ip6); /* jumbo / BIG TCP */
	__builtin_memcpy(p->saddr.a, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr.a, &ip6.daddr, 16);
	p->ip_len = sizeof(ip6) + plen;
	__u32 off = ETH_HLEN + sizeof(ip6);
	__u8 next = ip6.nexthdr;
#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		if (next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST &&
		    next != NEXTHDR_AUTH && next != NEXTHDR_FRAGMENT)
			break;
		__u8 h[4];
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)))
			goto fault;
		if (next == NEXTHDR_FRAGMENT) {
			__u16 fo = ((__u16)h[2] << 8) | h[3];
			p->fragment = 1;
			if (fo & 0xfff8)
				p->later_fragment = 1;
			off += 8;
		} else if (next == NEXTHDR_AUTH) {
			off += ((__u32)h[1] + 2) * 4;
		} else {
			off += ((__u32)h[1] + 1) * 8;
		}
		next = h[0];
	}
	if (next == NEXTHDR_HOP || next == NEXTHDR_ROUTING || next == NEXTHDR_DEST || next == NEXTHDR_AUTH ||
	    next == NEXTHDR_FRAGMENT) {
		tc_count(TC_STAT_EXT_HDR_LIMIT);
		next = 0; /* L4 header not found */
	}
	p->l3_hlen = off - ETH_HLEN;
	if (p->l3_hlen > p->ip_len)
		goto fault;
	p->l4_off = off;
	p->l4proto = next;
	return 0;
fault:
	tc_count(TC_STAT_HEADER_FAULT);
	return -1;
}

/* parse_ip reads the IP header (and IPv6 extension headers) of an Ethernet
 * frame. It returns 0 for an IP packet it understood, -1 otherwise. */
static __always_inline int parse_ip(struct __sk_buff *skb, struct pkt *p)
{
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (LOAD_HDR(skb, ETH_HLEN, &ip))
			goto fault;
		if (ip.version != 4 || ip.ihl < 5)
			goto fault;
		__u32 hlen = ip.ihl * 4;
		__u32 tot = bpf_ntohs(ip.tot_len);
		if (tot == 0 && skb->len > ETH_HLEN + hlen)
			tot = skb->len - ETH_HLEN; /* BIG TCP: the length is the skb's */
		if (tot < hlen)
			goto fault;
		__u16 frag = bpf_ntohs(ip.frag_off);
		map_v4(&p->saddr, ip.saddr);
		map_v4(&p->daddr, ip.daddr);
		p->l3_hlen = hlen;
		p->ip_len = tot;
		p->l4_off = ETH_HLEN + hlen;
		p->l4proto = ip.protocol;
		p->fragment = (frag & 0x3fff) != 0; /* MF or an offset */
		p->later_fragment = (frag & 0x1fff) != 0;
		return 0;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse_ip6(skb, p);
	return -1;
fault:
	tc_count(TC_STAT_HEADER_FAULT);
	return -1;
}

/* count_workloads adds a packet (segs segments; tcp: a TCP packet whose
 * header is there) to the workloads it comes from and goes to. Out of line
 * (see CLV_COLD): only node interfaces count workloads. */
static CLV_COLD void count_workloads(struct __sk_buff *skb, struct pkt *p, __u64 segs, int tcp)
{
	/* Per segment headers for GSO/GRO packets: IP, and TCP when it can
	 * be read (UDP GSO: 8 bytes). */
	__u64 bytes = p->ip_len, packets = segs;
	if (segs > 1) {
		__u32 l4h = 0;
		if (tcp) {
			__u8 doff;
			if (bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1) == 0)
				l4h = (doff >> 4) * 4;
		} else if (p->l4proto == IPPROTO_UDP) {
			l4h = 8;
		}
		bytes += (segs - 1) * (__u64)(p->l3_hlen + l4h);
	}
	__u32 *idx = bpf_map_lookup_elem(&workload_ips, &p->saddr);
	if (idx) {
		struct workload_counters *w = bpf_map_lookup_elem(&workload_traffic, idx);
		if (w) {
			w->tx_bytes += bytes;
			w->tx_packets += packets;
		}
	}
	idx = bpf_map_lookup_elem(&workload_ips, &p->daddr);
	if (idx) {
		struct workload_counters *w = bpf_map_lookup_elem(&workload_traffic, idx);
		if (w) {
			w->rx_bytes += bytes;
			w->rx_packets += packets;
		}
	}
}

static __always_inline int port_marked(__u16 port)
{
	__u32 idx = port >> 5;
	__u32 *w = bpf_map_lookup_elem(&port_marks, &idx);
	return w && (*w & (1u << (port & 31)));
}

/* may_track says whether a TCP packet between these ports can belong to a
 * connection Clovisor traces (see port_marks). The lower port is tested
 * first: it is usually the server's, the one marked, so a traced packet
 * usually reads one word of the bitmap, not two. */
static __always_inline int may_track(__u16 sport, __u16 dport)
{
	__u16 lo = sport < dport ? sport : dport, hi = sport ^ dport ^ lo;
	return track_all || port_marked(lo) || port_marked(hi) || port_marked(0);
}

/* server_match reports whether (addr, port) is a server Clovisor traces on
 * this interface, and its protocol id. A PROTO_IGNORE entry says no. */
static __always_inline int server_match(__u32 ifindex, const struct addr16 *addr, __u16 port, __u32 *proto)
{
	struct port_key pk = {.ifindex = ifindex, .port = port};
	__u32 *v = bpf_map_lookup_elem(&dports2proto, &pk);
	if (!v) {
		pk.ifindex = 0;
		v = bpf_map_lookup_elem(&dports2proto, &pk);
	}
	if (!v) {
		struct egress_key ek = {.prefixlen = 16 + 128};
		ek.port[0] = port >> 8;
		ek.port[1] = port & 0xff;
		__builtin_memcpy(ek.addr, addr->a, 16);
		v = bpf_map_lookup_elem(&egress_lookup_table, &ek);
		if (!v) {
			ek.port[0] = 0;
			ek.port[1] = 0;
			v = bpf_map_lookup_elem(&egress_lookup_table, &ek);
		}
	}
	if (!v)
		return 0;
	*proto = *v;
	return *v != PROTO_IGNORE;
}

static __always_inline void fill_tuple(struct conn_tuple *t, const struct flow_key *k, __u8 client_is_lo)
{
	if (client_is_lo) {
		__builtin_memcpy(t->client_addr, k->addr_lo, 16);
		__builtin_memcpy(t->server_addr, k->addr_hi, 16);
		t->client_port = k->port_lo;
		t->server_port = k->port_hi;
	} else {
		__builtin_memcpy(t->client_addr, k->addr_hi, 16);
		__builtin_memcpy(t->server_addr, k->addr_lo, 16);
		t->client_port = k->port_hi;
		t->server_port = k->port_lo;
	}
	t->ifindex = k->ifindex;
}

/*
 * end_exchange makes the record of the exchange (index, phase) of s and
 * starts the counts of the next one: the caller won the transition that
 * ended it. The record is lost (and counted) when the ring buffer is full;
 * the counts move on either way. The connection is the entry's key (a BPF
 * function takes five arguments at most).
 * Out of line: see CLV_COLD.
 */
static CLV_COLD void end_exchange(struct session *s, __u32 index, __u8 phase, __u8 end, __u64 now)
{
	__u32 zero = 0;
	struct exchange_event *e = bpf_map_lookup_elem(&exchange_scratch, &zero);
	if (e) {
		e->kind = TC_EVENT_EXCHANGE;
		e->end = end;
		e->phase = phase;
		e->_pad0 = 0;
		e->proto = s->proto;
		e->_pad1 = 0;
		fill_tuple(&e->tuple, &s->key, s->client_is_lo);
		e->index = index;
		e->conn_flags = s->conn_flags;
		e->req_seq0 = s->req_seq0;
		e->_pad2 = 0;
		e->first_ts = s->first_ts;
		e->syn_ts = s->dir[TC_DIR_REQUEST].open_ts;
		e->synack_ts = s->dir[TC_DIR_RESPONSE].open_ts;
		e->req_first_ts = s->dir[TC_DIR_REQUEST].first_ts;
		e->req_last_ts = s->dir[TC_DIR_REQUEST].last_ts;
		e->resp_first_ts = s->dir[TC_DIR_RESPONSE].first_ts;
		e->resp_last_ts = s->dir[TC_DIR_RESPONSE].last_ts;
		e->end_ts = now;
	}
#pragma unroll
	for (int d = 0; d < 2; d++) {
		/* Read each total once: what is added after the read belongs
		 * to the next exchange. */
		struct dir_counters cur;
		cur.bytes = *(volatile __u64 *)&s->dir[d].total.bytes;
		cur.packets = *(volatile __u64 *)&s->dir[d].total.packets;
		cur.payload_bytes = *(volatile __u64 *)&s->dir[d].total.payload_bytes;
		cur.new_bytes = *(volatile __u64 *)&s->dir[d].total.new_bytes;
		cur.retrans_packets = *(volatile __u64 *)&s->dir[d].total.retrans_packets;
		__u32 flags = __sync_lock_test_and_set(&s->dir[d].flags, 0);
		if (e) {
			e->flags[d] = flags;
			e->dir[d].bytes = cur.bytes - s->dir[d].base.bytes;
			e->dir[d].packets = cur.packets - s->dir[d].base.packets;
			e->dir[d].payload_bytes = cur.payload_bytes - s->dir[d].base.payload_bytes;
			e->dir[d].new_bytes = cur.new_bytes - s->dir[d].base.new_bytes;
			e->dir[d].retrans_packets = cur.retrans_packets - s->dir[d].base.retrans_packets;
		}
		s->dir[d].base = cur;
	}
	if (!e || bpf_ringbuf_output(&tc_events, e, sizeof(*e), tc_ringbuf_flags()))
		tc_count(TC_STAT_EXCHANGE_LOST);
}

/* What one packet adds to its direction's counters. */
struct pkt_counts {
	__u64 bytes, packets, payload, advance, old;
};

/* What capture is to send (a BPF function takes five arguments at most). */
struct capture_args {
	struct pkt_counts c; /* the packet's own counts, already added */
	__u64 now;
	__u32 index;
	__u32 off;  /* the new payload's offset in the packet */
	__u32 len;  /* and its length */
	__u32 seq;  /* its first byte's sequence number */
	__u32 dcap; /* the direction's prefix length */
	__u16 mark;
	__u8 dir;
	__u8 _pad;
};

/* capture sends the first dcap bytes of the packet's new payload (at off,
 * len bytes long) to user space, with the exchange's counts in this
 * direction before the packet (the packet's own, c, are already added) and
 * the other direction's progress. The connection is the entry's key. */
static CLV_COLD void capture(struct __sk_buff *skb, struct session *s, const struct capture_args *a)
{
	__u32 zero = 0;
	struct payload_scratch *sc = bpf_map_lookup_elem(&tc_scratch, &zero);
	if (!sc)
		return;
	struct payload_event *e = &sc->ev;
	__u8 dir = a->dir;
	__u32 d = dir & 1, off = a->off, len = a->len, dcap = a->dcap;
	const struct pkt_counts *c = &a->c;
	e->kind = TC_EVENT_PAYLOAD;
	e->dir = dir;
	e->index = a->index;
	fill_tuple(&e->tuple, &s->key, s->client_is_lo);
	e->first_ts = s->first_ts;
	e->ts = a->now;
	e->len = len;
	e->seq = a->seq;
	e->mark = a->mark;
	e->proto = s->proto;
	e->_pad1 = 0;
	e->at.bytes = s->dir[d].total.bytes - s->dir[d].base.bytes - c->bytes;
	e->at.packets = s->dir[d].total.packets - s->dir[d].base.packets - c->packets;
	e->at.payload_bytes = s->dir[d].total.payload_bytes - s->dir[d].base.payload_bytes - c->payload;
	e->at.new_bytes = s->dir[d].total.new_bytes - s->dir[d].base.new_bytes - c->advance;
	e->at.retrans_packets = s->dir[d].total.retrans_packets - s->dir[d].base.retrans_packets - (c->old > 0);
	e->peer_new_bytes = s->dir[d ^ 1].total.new_bytes - s->dir[d ^ 1].base.new_bytes;
	__u32 want = len < dcap ? len : dcap;
	if (want > MAX_PREFIX)
		want = MAX_PREFIX;
	if (want > 0) {
		/* n == want (1 <= want <= MAX_PREFIX), in a form whose bounds
		 * every verifier sees: at least 1, and inside data + spill. */
		__u32 n = ((want - 1) & PREFIX_MASK) + 1;
		if (bpf_skb_load_bytes(skb, off, e->data, n)) {
			tc_count(TC_STAT_PAYLOAD_FAULT);
			want = 0;
		}
	}
	e->cap = want;
	__u64 size = offsetof(struct payload_event, data) + want;
	/* Keeps clang from folding the test below into the tests of want
	 * above: older verifiers lose a bound tested on a register's copy. */
	asm volatile("" : "+r"(size));
	if (size > sizeof(*e))
		size = sizeof(*e);
	if (bpf_ringbuf_output(&tc_events, e, size, tc_ringbuf_flags()))
		tc_count(TC_STAT_PAYLOAD_LOST);
}

#define W4(a, b, c, d) ((__u32)(a) | (__u32)(b) << 8 | (__u32)(c) << 16 | (__u32)(d) << 24)

/* http_start reports whether the payload at off (len bytes) begins an
 * HTTP/1.x message of direction dir: a request line with a standard method,
 * or a status line ("HTTP/1."). The objects are little-endian only
 * (bpf2go -target amd64,arm64), which W4 assumes. */
static CLV_COLD int http_start(struct __sk_buff *skb, __u32 off, __u32 len, __u8 dir)
{
	if (len < 8)
		return 0;
	__u32 w[2];
	if (bpf_skb_load_bytes(skb, off, w, sizeof(w)))
		return 0;
	if (dir == TC_DIR_RESPONSE)
		return w[0] == W4('H', 'T', 'T', 'P') && (w[1] & 0xffffff) == W4('/', '1', '.', 0);
	switch (w[0]) {
	case W4('G', 'E', 'T', ' '):
	case W4('P', 'U', 'T', ' '):
		return 1;
	case W4('P', 'O', 'S', 'T'):
	case W4('H', 'E', 'A', 'D'):
		return (w[1] & 0xff) == ' ';
	case W4('D', 'E', 'L', 'E'): /* DELETE */
	case W4('O', 'P', 'T', 'I'): /* OPTIONS */
	case W4('P', 'A', 'T', 'C'): /* PATCH */
	case W4('C', 'O', 'N', 'N'): /* CONNECT */
	case W4('T', 'R', 'A', 'C'): /* TRACE */
		return 1;
	}
	return 0;
}

/* A 64-bit compare of two 16-byte addresses as native u64 pairs: any total
 * order does, as long as both directions agree on it. */
static __always_inline int addr_cmp(const struct addr16 *a, const struct addr16 *b)
{
	__u64 a0 = ((const __u64 *)a->a)[0], b0 = ((const __u64 *)b->a)[0];
	if (a0 != b0)
		return a0 < b0 ? -1 : 1;
	__u64 a1 = ((const __u64 *)a->a)[1], b1 = ((const __u64 *)b->a)[1];
	if (a1 != b1)
		return a1 < b1 ? -1 : 1;
	return 0;
}

/* flow_fp is the sessions table's key for a connection: each of the
 * flow_key's five words is mixed into a seeded multiply-xorshift state.
 * Every step is a bijection of the state, so two keys that differ only in
 * their last word never collide; others do with a chance of about 2^-64,
 * and the seed is random per load, so collisions cannot be made on
 * purpose. flow_eq tells a collision from the connection itself. */
#define FP_MUL 0x9E3779B97F4A7C15ull
_Static_assert(sizeof(struct flow_key) == 40, "flow_fp and flow_eq read the key as five u64 words");
static __always_inline __u64 flow_fp(const struct flow_key *k)
{
	const __u64 *w = (const __u64 *)k;
	__u64 x = fp_seed;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*k) / 8); i++) {
		x = (x ^ w[i]) * FP_MUL;
		x ^= x >> 32;
	}
	return x;
}

static __always_inline int flow_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	/* One test, not five: fewer branches for the verifier to follow. */
	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4])) == 0;
}

/* new_session makes the entry of a connection first seen now, or finds the
 * one a concurrent packet made. */
static __always_inline struct session *new_session(const struct flow_key *k, __u8 client_is_lo, __u32 proto,
						   __u32 origin, __u64 now)
{
	/* track_tcp has the fingerprint already; computing it again here, on
	 * the rare path, keeps it from living across track_tcp, which took
	 * the 6.1 verifier past its instruction limit. */
	__u64 fp = flow_fp(k);
	__u32 zero = 0;
	struct session *init = bpf_map_lookup_elem(&session_init, &zero);
	if (!init)
		return 0;
	__builtin_memset(init, 0, sizeof(*init));
	init->first_ts = now;
	init->client_is_lo = client_is_lo;
	init->proto = proto;
	init->conn_flags = origin;
	init->key = *k;
	if (bpf_map_update_elem(&sessions, &fp, init, BPF_NOEXIST) == 0)
		tc_count(TC_STAT_SESSION_CREATED);
	struct session *s = bpf_map_lookup_elem(&sessions, &fp);
	if (!s) {
		tc_count(TC_STAT_SESSION_FULL);
		return 0;
	}
	if (!flow_eq(&s->key, k)) {
		/* A concurrent packet of a colliding connection made it. */
		tc_count(TC_STAT_KEY_COLLISION);
		return 0;
	}
	return s;
}

#ifndef CLV_INLINE_ALL
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
struct sk_buff___clv {
	__u8 tc_at_ingress : 1;
} __attribute__((preserve_access_index));
#endif

/* hook_ingress says whether the run is at an ingress hook: from the
 * program's hook (HOOK_INGRESS, HOOK_EGRESS) or, for HOOK_ASK, from the
 * sk_buff's tc_at_ingress bit, which the kernel sets before running ingress
 * programs and clears before egress ones (bpf_cast_to_kern_ctx: 6.2+; tc is
 * loaded from 6.4 on). A packet that leaves by the interface it came in by
 * (a hairpin) has ingress_ifindex == ifindex at egress as well, so that
 * comparison does not tell the hooks apart. */
static __always_inline int hook_ingress(struct __sk_buff *skb, int hook)
{
#ifndef CLV_INLINE_ALL
	if (hook == HOOK_ASK) {
		struct sk_buff___clv *k = bpf_cast_to_kern_ctx(skb);
		return BPF_CORE_READ_BITFIELD(k, tc_at_ingress);
	}
#endif
	return hook == HOOK_INGRESS;
}

/* packet_time is the time of a packet that needs one, in CLOCK_MONOTONIC
 * nanoseconds. A packet that a TCP stack of this node sent carries its
 * departure time in skb->tstamp (EDT: tcp_wstamp_ns, the time the stack
 * sent it, or the time a pacing qdisc may let it go), marked
 * BPF_SKB_CLOCK_MONOTONIC, and the kernel keeps it across veths and
 * forwarding (Linux 5.18 on): that time is taken, which spares the clock
 * read, about a seventh of a run. Any other packet (one from another
 * machine, whose tstamp is a receive time in CLOCK_REALTIME or 0) takes the
 * clock now. tcInline (kernels before 6.4, where __sk_buff->tstamp_type
 * may not exist: it came in 5.18) always reads the clock. */
static __always_inline __u64 packet_time(struct __sk_buff *skb)
{
#ifndef CLV_INLINE_ALL
	if (skb->tstamp_type == BPF_SKB_CLOCK_MONOTONIC) {
		__u64 t = skb->tstamp;
		if (t)
			return t;
	}
#endif
	return bpf_ktime_get_ns();
}

/* What open_session needs to know of a packet besides its addresses. */
struct open_args {
	__u64 now;
	__u16 sport, dport;
	__u8 from_lo; /* the packet's source is the key's lo endpoint */
	__u8 syn, synack;
	__u8 ingress; /* the hook is ingress */
};

/* open_session makes the entry of a connection whose packet (p, k, a) has
 * none yet, when a table says it is traced (or track_all), and finds which
 * end is the client. It returns 0 for a connection not traced. */
static CLV_COLD struct session *open_session(const struct pkt *p, const struct flow_key *k,
					       const struct open_args *a)
{
	__u32 ifindex = k->ifindex, proto = 0, origin;
	__u16 sport = a->sport, dport = a->dport;
	__u8 client_is_src;
	if (a->syn) {
		if (!server_match(ifindex, &p->daddr, dport, &proto) && (proto == PROTO_IGNORE || !track_all))
			return 0;
		client_is_src = 1;
		origin = CONN_FROM_SYN;
	} else if (a->synack) {
		if (!server_match(ifindex, &p->saddr, sport, &proto) && (proto == PROTO_IGNORE || !track_all))
			return 0;
		client_is_src = 0;
		origin = CONN_FROM_SYNACK;
	} else {
		origin = CONN_FROM_MIDSTREAM;
		if (server_match(ifindex, &p->daddr, dport, &proto)) {
			client_is_src = 1;
		} else if (proto == PROTO_IGNORE) {
			return 0;
		} else if (server_match(ifindex, &p->saddr, sport, &proto)) {
			client_is_src = 0;
		} else if (proto == PROTO_IGNORE || !track_all) {
			return 0;
		} else {
			/* Nothing says which end serves: ephemeral ports are
			 * the higher ones. */
			client_is_src = sport > dport || (sport == dport && a->from_lo);
			origin |= CONN_ROLES_GUESSED;
		}
	}
	/* The client's packets cross this hook when this one is the client's
	 * and the hook is ingress, or neither. */
	if (client_is_src == a->ingress)
		origin |= CONN_CLIENT_INGRESS;
	__u8 client_is_lo = client_is_src ? a->from_lo : !a->from_lo;
	return new_session(k, client_is_lo, proto, origin, a->now);
}

/* close_session makes the last record of a connection and removes it; only
 * the caller that sets CONN_CLOSED does. */
static CLV_COLD void close_session(struct session *s, __u8 end, __u64 now)
{
	__u32 old = __sync_fetch_and_or(&s->conn_flags, CONN_CLOSED);
	if (old & CONN_CLOSED)
		return;
	__u64 st = *(volatile __u64 *)&s->state;
	end_exchange(s, st >> 8, st & 0xff, end, now);
	__u64 fp = flow_fp(&s->key);
	bpf_map_delete_elem(&sessions, &fp);
	tc_count(TC_STAT_SESSION_CLOSED);
}

/* track_tcp follows one TCP packet of a connection; hook says which hook
 * runs (HOOK_*). */
static __always_inline void track_tcp(struct __sk_buff *skb, struct pkt *p, __u64 wire_bytes, __u64 segs,
				      int hook)
{
	struct tcphdr tcp;
	if (LOAD_HDR(skb, p->l4_off, &tcp)) {
		tc_count(TC_STAT_HEADER_FAULT);
		return;
	}
	__u32 thlen = tcp.doff * 4;
	if (thlen < sizeof(tcp) || p->l3_hlen + thlen > p->ip_len) {
		tc_count(TC_STAT_HEADER_FAULT);
		return;
	}
	__u32 payload = p->ip_len - p->l3_hlen - thlen;
	__u8 tflags = ((__u8 *)&tcp)[13];
	__u16 sport = bpf_ntohs(tcp.source), dport = bpf_ntohs(tcp.dest);
	if (!may_track(sport, dport))
		return;
	__u32 ifindex = skb->ifindex;
	int syn = (tflags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	int synack = (tflags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK);

	/* GSO/GRO: segments carry one set of headers each. */
	if (segs > 1)
		wire_bytes += (segs - 1) * (__u64)(p->l3_hlen + thlen);

	struct flow_key k;
	int c = addr_cmp(&p->saddr, &p->daddr);
	__u8 from_lo = c < 0 || (c == 0 && sport <= dport);
	if (from_lo) {
		__builtin_memcpy(k.addr_lo, p->saddr.a, 16);
		__builtin_memcpy(k.addr_hi, p->daddr.a, 16);
		k.port_lo = sport;
		k.port_hi = dport;
	} else {
		__builtin_memcpy(k.addr_lo, p->daddr.a, 16);
		__builtin_memcpy(k.addr_hi, p->saddr.a, 16);
		k.port_lo = dport;
		k.port_hi = sport;
	}
	k.ifindex = ifindex;

	__u64 fp = flow_fp(&k);
	struct session *s = bpf_map_lookup_elem(&sessions, &fp);
	if (s && !flow_eq(&s->key, &k)) {
		/* Another connection holds the fingerprint: this one is not
		 * traced while it does. */
		tc_count(TC_STAT_KEY_COLLISION);
		return;
	}
	if (!s && !syn && !synack && payload == 0)
		return; /* only a SYN, a SYN-ACK or payload opens a session */
	/* A pure ACK of a known connection needs no time. */
	__u64 now = 0;
	if (!s || payload > 0 || (tflags & (TCP_SYN | TCP_FIN | TCP_RST)))
		now = packet_time(skb);
	if (s && syn) {
		/* A new connection on the tuple of one that never closed (or
		 * the SYN is a retransmission: then nothing happened yet). */
		__u64 st = *(volatile __u64 *)&s->state;
		if (st != 0 || (s->conn_flags & (CONN_FIN_REQUEST | CONN_FIN_RESPONSE))) {
			close_session(s, END_REUSED, now);
			s = 0;
		}
	}
	if (!s) {
		struct open_args oa = {
			.now = now,
			.sport = sport,
			.dport = dport,
			.from_lo = from_lo,
			.syn = syn,
			.synack = synack,
			.ingress = hook_ingress(skb, hook),
		};
		s = open_session(p, &k, &oa);
		if (!s)
			return;
	}

	__u8 dir = from_lo == s->client_is_lo ? TC_DIR_REQUEST : TC_DIR_RESPONSE;
	__u32 seq = bpf_ntohl(tcp.seq);
	if (syn && dir == TC_DIR_REQUEST) {
		/* The first SYN's time: a retransmission's wait is part of
		 * the handshake the client waited for, and the SYN-ACK may
		 * answer the first SYN (sent before the retransmission). */
		if (s->dir[TC_DIR_REQUEST].open_ts == 0)
			s->dir[TC_DIR_REQUEST].open_ts = now;
		if (!(s->conn_flags & CONN_SEQ0)) {
			s->req_seq0 = seq + 1;
			__sync_fetch_and_or(&s->conn_flags, CONN_SEQ0);
		}
	}
	if (synack && dir == TC_DIR_RESPONSE) {
		if (s->dir[TC_DIR_RESPONSE].open_ts == 0)
			s->dir[TC_DIR_RESPONSE].open_ts = now;
		if (!(s->conn_flags & CONN_SEQ0)) {
			/* It acknowledges the client's SYN: the first request
			 * byte comes next. */
			s->req_seq0 = bpf_ntohl(tcp.ack_seq);
			__sync_fetch_and_or(&s->conn_flags, CONN_SEQ0);
		}
	}

	/* The stream's progress: the highest sequence only goes up (an atomic
	 * maximum, modulo 2^32), and what it advanced by is the stream's new
	 * bytes, exactly, whatever arrives twice or out of order. A packet
	 * with bytes at or below it carries old data (a retransmission, or a
	 * packet reordered, also between CPUs processing one flow). */
	__u32 d1 = dir & 1;
	__u32 hbit = dir == TC_DIR_REQUEST ? CONN_HIGH_REQUEST : CONN_HIGH_RESPONSE;
	if ((syn || synack) && !(s->conn_flags & hbit)) {
		s->dir[d1].high_end = seq + 1; /* the stream starts after the SYN */
		__sync_fetch_and_or(&s->conn_flags, hbit);
	}
	__u32 fresh = 0, old = 0;
	__u64 advance = 0;
	if (payload > 0) {
		if (tflags & TCP_SYN)
			seq++; /* data on a SYN (TCP Fast Open) follows it */
		__u32 end = seq + payload;
		if (!(s->conn_flags & hbit)) {
			/* Picked up midstream: the stream starts here. */
			s->dir[d1].high_end = seq;
			__sync_fetch_and_or(&s->conn_flags, hbit);
		}
		__u32 high = *(volatile __u32 *)&s->dir[d1].high_end;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			if ((__s32)(end - high) <= 0)
				break;
			__u32 prev = __sync_val_compare_and_swap(&s->dir[d1].high_end, high, end);
			if (prev == high) {
				advance = end - high;
				break;
			}
			high = prev;
		}
		if ((__s32)(seq - high) < 0) {
			__u32 behind = high - seq;
			old = behind < payload ? behind : payload;
		}
		fresh = payload - old;
		if (advance == 0)
			fresh = 0; /* nothing new: a concurrent packet carried it */
	}
	__u32 poff = p->l4_off + thlen + old; /* the new payload */
	__u32 dcap = dir == TC_DIR_RESPONSE ? payload_cap_resp : payload_cap;

	/* The exchange: new request payload after response payload starts
	 * the next one; the first new payload of each direction is captured
	 * (mark 0), and on HTTP connections every later packet of the
	 * exchange that begins a message (marks 1, 2, ...: pipelining). */
	int cap = 0;
	__u32 index = 0;
	__u16 mark = 0;
	if (advance > 0) {
		int done = 0, cont = 0;
#pragma unroll
		for (int attempt = 0; attempt < 2 && !done; attempt++) {
			__u64 st = *(volatile __u64 *)&s->state;
			__u8 phase = st & 0xff;
			index = st >> 8;
			__u64 next;
			if (dir == TC_DIR_REQUEST) {
				if (phase == PHASE_REQUEST) {
					s->dir[TC_DIR_REQUEST].last_ts = now;
					done = cont = 1;
					break;
				}
				if (phase == PHASE_RESPONSE)
					next = ((__u64)(index + 1) << 8) | PHASE_REQUEST;
				else
					next = ((__u64)index << 8) | PHASE_REQUEST;
				if (__sync_val_compare_and_swap(&s->state, st, next) != st)
					continue;
				if (phase == PHASE_RESPONSE) {
					end_exchange(s, index, phase, END_NEXT_REQUEST, now);
					index++;
				}
				s->dir[TC_DIR_REQUEST].first_ts = now;
				s->dir[TC_DIR_REQUEST].last_ts = now;
				s->dir[TC_DIR_RESPONSE].first_ts = 0;
				s->dir[TC_DIR_RESPONSE].last_ts = 0;
				s->dir[0].marks = 0;
				s->dir[1].marks = 0;
			} else {
				if (phase == PHASE_RESPONSE) {
					s->dir[TC_DIR_RESPONSE].last_ts = now;
					done = cont = 1;
					break;
				}
				next = ((__u64)index << 8) | PHASE_RESPONSE;
				if (__sync_val_compare_and_swap(&s->state, st, next) != st)
					continue;
				s->dir[TC_DIR_RESPONSE].first_ts = now;
				s->dir[TC_DIR_RESPONSE].last_ts = now;
			}
			cap = 1;
			done = 1;
		}
		if (!done)
			tc_count(TC_STAT_STATE_RACE);
		if (dcap) {
			if (cap && dir == TC_DIR_REQUEST && !(s->conn_flags & CONN_HTTP) &&
			    http_start(skb, poff, fresh, dir))
				__sync_fetch_and_or(&s->conn_flags, CONN_HTTP);
			if (cont && old == 0 && (s->conn_flags & CONN_HTTP) && http_start(skb, poff, fresh, dir)) {
				__u32 n = __sync_fetch_and_add(&s->dir[d1].marks, 1) + 1;
				if (n <= MAX_MARKS) {
					cap = 1;
					mark = n;
				} else {
					tc_count(TC_STAT_MARK_LIMIT);
				}
			}
		}
	}

	struct dir_counters *t = &s->dir[d1].total;
	__sync_fetch_and_add(&t->bytes, wire_bytes);
	__sync_fetch_and_add(&t->packets, segs);
	if (payload > 0)
		__sync_fetch_and_add(&t->payload_bytes, payload);
	if (advance > 0)
		__sync_fetch_and_add(&t->new_bytes, advance);
	if (old > 0)
		__sync_fetch_and_add(&t->retrans_packets, 1);
	/* A plain read first: most packets bring no flag not seen yet. */
	if ((s->dir[d1].flags & tflags) != tflags)
		__sync_fetch_and_or(&s->dir[d1].flags, tflags);

	if (cap && dcap) {
		struct capture_args ca = {
			.c = {wire_bytes, segs, payload, advance, old},
			.now = now,
			.index = index,
			.off = poff,
			.len = fresh,
			.seq = seq + old,
			.dcap = dcap,
			.mark = mark,
			.dir = dir,
		};
		capture(skb, s, &ca);
	}

	if (tflags & TCP_RST) {
		close_session(s, END_RST, now);
	} else if (tflags & TCP_FIN) {
		__u32 bit = dir == TC_DIR_REQUEST ? CONN_FIN_REQUEST : CONN_FIN_RESPONSE;
		__u32 before = __sync_fetch_and_or(&s->conn_flags, bit);
		if (((before | bit) & (CONN_FIN_REQUEST | CONN_FIN_RESPONSE)) == (CONN_FIN_REQUEST | CONN_FIN_RESPONSE))
			close_session(s, END_FIN, now);
	}
}

/* handle is the whole program: it always lets the packet pass. */
static __always_inline int handle(struct __sk_buff *skb, int hook)
{
	__u32 ifindex = skb->ifindex;
	struct iface_cfg *cfg;
	if (ifindex < IFACES_ARRAY) {
		cfg = bpf_map_lookup_elem(&ifaces, &ifindex);
	} else {
		cfg = bpf_map_lookup_elem(&ifaces_high, &ifindex);
		/* Keeps the compiler from merging the two lookups into one
		 * call site: the verifier inlines a site only when it sees
		 * one array map there. */
		asm volatile("" ::: "memory");
	}
	if (!cfg || !cfg->flags)
		return TC_PASS;
	__u32 flags = cfg->flags;

	struct pkt p = {};
	if (parse_ip(skb, &p))
		return TC_PASS;

	__u64 segs = skb->gso_segs;
	if (segs == 0)
		segs = 1;
	int tcp = p.l4proto == IPPROTO_TCP && !p.later_fragment;

	if (flags & IFACE_WORKLOADS) {
		count_workloads(skb, &p, segs, tcp);
	}
	if (p.later_fragment)
		tc_count(TC_STAT_FRAGMENTS);
	if ((flags & IFACE_SESSIONS) && tcp)
		track_tcp(skb, &p, p.ip_len, segs, hook);
	return TC_PASS;
}

#endif /* CLOVISOR_TC_H */
