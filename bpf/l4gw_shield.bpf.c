// SPDX-License-Identifier: GPL-2.0
/*
 * l4gw shield: drops new connections from listed client addresses at ingress, before
 * they reach nftables (TPROXY) or the gateway (reference/shield.md).
 *
 * Two entry points share one parser: l4gw_shield_xdp (an XDP link, native where the
 * driver has it) and l4gw_shield_tc (a tcx link on kernels >= 6.6; the same program
 * works as a direct-action clsact filter). userspace: gateway/shield/kernel.py.
 *
 * Rules kept:
 *  S1  Only new connections to the gateway's ports are ever dropped: TCP SYN without
 *      ACK to a port set in l4gw_shield_prt.tcp, and any UDP datagram to a port set in
 *      .udp (a stateless program cannot tell a flow's first datagram, so a listed
 *      source loses every datagram to a UDP listener port, and only those). Everything
 *      else passes: established TCP, SSH and other host listeners, ICMP, ND.
 *  S2  Fail closed for listed sources: when the headers cannot be walked to L4 (an
 *      IPv6 extension-header chain longer than L4GW_SHIELD_EXT_MAX, ESP, a truncated
 *      or malformed header), a listed source is dropped. The verdict is that of
 *      "look up the source first, then parse L4"; the lookup is made only when the
 *      packet is a new connection to our ports or cannot be parsed, because the
 *      verdict of every other packet is "pass" whatever the lookup says, and bulk
 *      traffic (ACKs) then costs no trie walk (shield.md §3: 30 ns vs 43-166 ns).
 *  S3  Fragments: a non-first fragment (IPv4 offset != 0, IPv6 fragment header with
 *      offset != 0) has no L4 header and passes; dropping the first fragment already
 *      keeps the datagram from being reassembled.
 *  S4  VLAN: up to two tags (802.1Q, 802.1ad) are skipped. XDP sees them in the
 *      frame; tc never does (the stack untags before tc), and NICs with rx-vlan
 *      offload strip them before XDP too.
 *  S5  Pass in tc/tcx is TC_ACT_UNSPEC (-1, TCX_NEXT): any other value ends the chain
 *      and would override programs behind ours. Drop is TC_ACT_SHOT (TCX_DROP).
 *  S6  Expiry: an entry whose deadline (CLOCK_MONOTONIC ns; bpf_ktime_get_ns is that
 *      clock, and time.monotonic_ns() in userspace) is not 0 and has passed no longer
 *      drops; userspace removes it at its next sweep.
 *  S7  tc only: an skb may hold part of its headers outside its linear area (some
 *      drivers build it from page fragments), where the parser cannot read them and
 *      S2 would drop an established packet of a listed source. The first
 *      L4GW_SHIELD_PULL bytes are pulled into the linear area first (bpf_skb_pull_data)
 *      when they are not there (the program is loaded without XDP frags support, so an
 *      XDP frame is one buffer, linear up to data_end). No test makes such an skb:
 *      BPF_PROG_TEST_RUN builds linear ones, and veth delivers linear headers.
 *
 * Maps (the layout is what userspace writes; host byte order unless noted):
 *
 *  l4gw_shield_lpm  LPM_TRIE, BPF_F_NO_PREALLOC, max_entries set by userspace.
 *    key   struct l4gw_shield_key  (20 bytes)
 *            u32 prefixlen          0..128; IPv4 a.b.c.d/n is ::ffff:a.b.c.d/(96+n)
 *            u8  addr[16]           network order; IPv4 mapped into ::ffff:0:0/96
 *    value struct l4gw_shield_entry (24 bytes)
 *            u64 deadline_ns        CLOCK_MONOTONIC; 0 = no expiry
 *            u64 drops              packets this entry dropped (atomic add by the
 *                                   program; userspace writes 0 on a new entry and
 *                                   carries the count over when it re-puts one)
 *            u32 prefixlen          a copy of the key's prefixlen: a userspace lookup
 *                                   is longest-match, so this tells an exact hit from
 *                                   a covering entry
 *            u32 reserved           0
 *    An IPv6 prefix of /80 or shorter that covers ::ffff:0:0/96 would match every
 *    IPv4 source; userspace refuses to put one (shield.md §3).
 *    The entries' reason and source are not here: they are policy metadata, kept by
 *    gateway/shield/table.py, which also works when this program cannot load.
 *
 *  l4gw_shield_prt  ARRAY, 1 entry: struct l4gw_shield_ports, two bitmaps of 65536
 *    bits (u8 tcp[8192], u8 udp[8192]); port p is bit (p & 7) of byte p >> 3.
 *
 *  l4gw_shield_ctr  PERCPU_ARRAY, 2 entries of u64: [0] passed (packets looked up and
 *    passed: new connections to our ports from unlisted or expired sources, and
 *    unparseable packets from unlisted sources), [1] dropped.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Sized for userspace to override with bpf_map__set_max_entries() before load. */
#define L4GW_SHIELD_MAX 65536
/* IPv6 extension headers walked before giving up (S2); xdp-tools uses 6, and Linux
 * 6.18 still answered a SYN behind 8 (shield.md §4), so a listed source behind more
 * than this is dropped rather than let through. */
#define L4GW_SHIELD_EXT_MAX 6
#define L4GW_VLAN_MAX 2
/* S7: bytes of headers the tc entry makes linear: Ethernet, two VLAN tags, IPv6 and a
 * few extension headers, TCP. */
#define L4GW_SHIELD_PULL 256

#define CTR_PASSED 0
#define CTR_DROPPED 1

struct l4gw_shield_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct l4gw_shield_entry {
	__u64 deadline_ns;
	__u64 drops;
	__u32 prefixlen;
	__u32 reserved;
};

struct l4gw_shield_ports {
	__u8 tcp[8192];
	__u8 udp[8192];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, L4GW_SHIELD_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l4gw_shield_key);
	__type(value, struct l4gw_shield_entry);
} l4gw_shield_lpm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l4gw_shield_ports);
} l4gw_shield_prt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} l4gw_shield_ctr SEC(".maps");

struct vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct ipv6_opt {
	__u8 nexthdr;
	__u8 len;
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 id;
};

/* What the parser found. */
enum l4gw_parse {
	PARSE_OTHER,	/* not a new connection to our ports: pass without a lookup */
	PARSE_NEW,	/* a new connection to our ports: drop if listed */
	PARSE_UNKNOWN,	/* could not reach L4: drop if listed (S2) */
};

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&l4gw_shield_ctr, &which);

	if (c)
		*c += 1;	/* per-CPU: no atomic needed */
}

static __always_inline int port_set(const __u8 *bitmap, __u16 port)
{
	return bitmap[port >> 3] & (1 << (port & 7));
}

/* L4 at l4 (protocol proto): is it a new connection to one of our ports? */
static __always_inline enum l4gw_parse parse_l4(void *l4, void *end, __u8 proto)
{
	__u32 zero = 0;
	struct l4gw_shield_ports *ports;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end)
			return PARSE_UNKNOWN;
		if (!th->syn || th->ack)
			return PARSE_OTHER;
		ports = bpf_map_lookup_elem(&l4gw_shield_prt, &zero);
		if (ports && port_set(ports->tcp, bpf_ntohs(th->dest)))
			return PARSE_NEW;
		return PARSE_OTHER;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return PARSE_UNKNOWN;
		ports = bpf_map_lookup_elem(&l4gw_shield_prt, &zero);
		if (ports && port_set(ports->udp, bpf_ntohs(uh->dest)))
			return PARSE_NEW;
		return PARSE_OTHER;
	}
	return PARSE_OTHER;
}

static __always_inline enum l4gw_parse parse_ipv4(void *data, void *end,
						  struct l4gw_shield_key *key)
{
	struct iphdr *iph = data;
	__u32 hlen;

	if ((void *)(iph + 1) > end)
		return PARSE_UNKNOWN;
	key->prefixlen = 128;
	key->addr[10] = 0xff;
	key->addr[11] = 0xff;
	__builtin_memcpy(&key->addr[12], &iph->saddr, 4);
	hlen = iph->ihl * 4;
	if (hlen < sizeof(*iph))
		return PARSE_UNKNOWN;
	/* S3: a non-first fragment carries no L4 header. */
	if (iph->frag_off & bpf_htons(0x1fff))
		return PARSE_OTHER;
	if (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP)
		return PARSE_OTHER;
	return parse_l4(data + hlen, end, iph->protocol);
}

/* Step *cur over the extension header it points at, whose length is
 * (len + bias) * unit octets, and read the next header's type into *nexthdr.
 * 0: done; -1: the header is cut short (the caller drops if listed, S2).
 */
static __always_inline int skip_ext(void **cur, void *end, __u8 *nexthdr,
				    __u32 bias, __u32 unit)
{
	struct ipv6_opt *opt = *cur;

	if ((void *)(opt + 1) > end)
		return -1;
	*nexthdr = opt->nexthdr;
	*cur += (opt->len + bias) * unit;
	return 0;
}

static __always_inline enum l4gw_parse parse_ipv6(void *data, void *end,
						  struct l4gw_shield_key *key)
{
	struct ipv6hdr *ip6h = data;
	void *cur;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6h + 1) > end)
		return PARSE_UNKNOWN;
	key->prefixlen = 128;
	__builtin_memcpy(key->addr, &ip6h->saddr, 16);
	nexthdr = ip6h->nexthdr;
	cur = ip6h + 1;
#pragma unroll
	for (i = 0; i < L4GW_SHIELD_EXT_MAX; i++) {
		switch (nexthdr) {
		case IPPROTO_TCP:
		case IPPROTO_UDP:
			return parse_l4(cur, end, nexthdr);
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			/* RFC 8200: the length is in 8-octet units, not counting the first 8. */
			if (skip_ext(&cur, end, &nexthdr, 1, 8))
				return PARSE_UNKNOWN;
			break;
		case IPPROTO_AH:
			/* RFC 4302: the length is in 4-octet units, minus 2. */
			if (skip_ext(&cur, end, &nexthdr, 2, 4))
				return PARSE_UNKNOWN;
			break;
		case IPPROTO_FRAGMENT: {
			struct ipv6_frag *fh = cur;

			if ((void *)(fh + 1) > end)
				return PARSE_UNKNOWN;
			if (fh->frag_off & bpf_htons(0xfff8))
				return PARSE_OTHER;	/* S3 */
			nexthdr = fh->nexthdr;
			cur = fh + 1;
			break;
		}
		case IPPROTO_ESP:
			return PARSE_UNKNOWN;	/* encrypted: L4 is out of reach */
		default:
			return PARSE_OTHER;	/* ICMPv6, no next header, ... */
		}
	}
	/* The walk ran out: S2 if another extension header (or ESP) follows. */
	switch (nexthdr) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		return parse_l4(cur, end, nexthdr);
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
	case IPPROTO_ESP:
		return PARSE_UNKNOWN;
	default:
		return PARSE_OTHER;
	}
}

/* 1: drop, 0: pass. */
static __always_inline int shield(void *data, void *end)
{
	struct l4gw_shield_key key = {};
	struct l4gw_shield_entry *e;
	struct ethhdr *eth = data;
	enum l4gw_parse what;
	void *cur;
	__u16 proto;
	int i;

	if ((void *)(eth + 1) > end)
		return 0;
	proto = eth->h_proto;
	cur = eth + 1;
#pragma unroll
	for (i = 0; i < L4GW_VLAN_MAX; i++) {
		struct vlan_hdr *vh = cur;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vh + 1) > end)
			return 0;
		proto = vh->proto;
		cur = vh + 1;
	}
	if (proto == bpf_htons(ETH_P_IP))
		what = parse_ipv4(cur, end, &key);
	else if (proto == bpf_htons(ETH_P_IPV6))
		what = parse_ipv6(cur, end, &key);
	else
		return 0;
	/* No source address read (a truncated IP header): nothing to look up. */
	if (what == PARSE_OTHER || key.prefixlen == 0)
		return 0;
	e = bpf_map_lookup_elem(&l4gw_shield_lpm, &key);
	if (!e || (e->deadline_ns && bpf_ktime_get_ns() >= e->deadline_ns)) {
		count(CTR_PASSED);
		return 0;
	}
	__sync_fetch_and_add(&e->drops, 1);
	count(CTR_DROPPED);
	return 1;
}

SEC("xdp")
int l4gw_shield_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	return shield(data, end) ? XDP_DROP : XDP_PASS;
}

SEC("tc")
int l4gw_shield_tc(struct __sk_buff *skb)
{
	void *data, *end;
	__u32 want = skb->len < L4GW_SHIELD_PULL ? skb->len : L4GW_SHIELD_PULL;

	/* S7: headers past the skb's linear part are out of the parser's reach; pull
	 * them in (a no-op for the usual skb, whose headers are linear already). */
	if (skb->data_end - skb->data < want)
		bpf_skb_pull_data(skb, want);
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;

	/* S5 */
	return shield(data, end) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

char _license[] SEC("license") = "GPL";
