// SPDX-License-Identifier: GPL-2.0
/*
 * l4gw sockmap accelerator: an sk_skb stream-verdict program that redirects each
 * received skb of an armed socket to the egress of its peer socket.
 *
 * Rules kept (reference/sockmap.md §7/§8; the numbers are §8's):
 *  R1  Attached as BPF_SK_SKB_STREAM_VERDICT with no parser; redirect flags 0 (egress).
 *  R2  Never SK_DROP for payload: a missing peer or a failed redirect returns SK_PASS, so the bytes
 *      stay readable and rmem-charged on the source (the window closes) instead of being
 *      ACKed and freed. Both are counted as anomalies.
 *  R3  A zero-length skb (pure FIN) is never redirected: the backlog treats a 0-byte
 *      send as a hard error and would put EPIPE on the peer. It is not passed either,
 *      unlike §8 R3 says: when this socket's own redirect backlog (ingress_skb) is
 *      non-empty, sk_psock_verdict_apply queues a PASSed skb behind it, the worker
 *      "sends" it out of this socket with len 0 and sets EPIPE here, killing the
 *      reverse direction [measured on 6.18: FIN on A while B->A streamed]. Dropping
 *      a 0-byte skb loses no payload (tcp_eat_skb is a no-op for len 0) and the FIN
 *      state is already in sk_shutdown (RDHUP, recv() == 0).
 *  R4  Redirect through l4gw_targets (no program attached), which userspace fills before
 *      l4gw_active, so the peer always exists once a verdict can run.
 *  R12 Backpressure by credit: userspace keeps l4gw_credit[cookie].limit at "bytes the
 *      peer has written + high watermark". A payload skb that would take the redirected
 *      count past it is *held*: passed to this socket's own queue, where it is charged to
 *      the receive buffer, so the TCP window closes and the sender stops. The redirect
 *      backlog (which no socket is charged for) is thereby bounded by the watermark plus
 *      one skb, whatever the poll rate of userspace.
 *      Held bytes reach the peer through userspace (it reads them once the backlog has
 *      drained, writes them to the peer, then adds them to credit.forwarded). Until
 *      held == forwarded every further skb is held too, so the stream cannot reorder:
 *      verdicts of one socket are serialised under its lock, so this check and the
 *      count it compares against cannot interleave with another verdict of the socket.
 *  R13 Counting never changes the verdict; counters live in pre-created HASH entries
 *      keyed by socket cookie (no LRU: eviction would corrupt the drain check).
 *  R18 Each payload byte reaches the verdict once. tcp_read_skb hands over whole skbs and
 *      ignores how much of one TCP already had: a retransmission that overlaps bytes
 *      received before (seq < rcv_nxt < end_seq: the sender re-cut its segments after a
 *      loss or a reordering) is queued whole, and redirecting it whole sends the
 *      overlap twice [measured on 6.18: a crafted segment 500 bytes back, and about one
 *      flow in a hundred of several MiB through 5 % loss, got a segment duplicated].
 *      So the program keeps the sequence number of the next byte (TCP_SKB_CB's seq is
 *      the first word of the sk_skb cb) and cuts what lies before it off the head with
 *      bpf_skb_adjust_room; an skb with nothing new is dropped (its bytes went already).
 *      The first payload skb after arming takes the number from the socket's copied_seq
 *      (the next byte userspace has not read), so a head skb userspace read in part
 *      before arming, or one a segment was coalesced into while userspace read it, is
 *      cut the same way; userspace cross-checks the counts against TCP_INFO.
 *  R19 What userspace must act on wakes it: the first held skb of a hold (R12) and every
 *      anomaly put the socket's cookie in l4gw_events, a ring buffer userspace waits on,
 *      so the watchdog need not poll for them and a quiet flow costs no wakeups. A full
 *      ring loses the event, never the bytes: the hold is still enforced here, and
 *      userspace sees it at its next look.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* The one field of the kernel's struct tcp_sock the program reads (R18), relocated
 * against the running kernel's BTF by libbpf (CO-RE): no vmlinux.h needed. */
struct tcp_sock {
	__u32 copied_seq;
} __attribute__((preserve_access_index));

/* Sized for userspace to override with bpf_map__set_max_entries() before load. */
#define L4GW_MAX_SOCKS 65536
/* bpf_skb_adjust_room shrinks an sk_skb by at most this much per call. */
#define L4GW_TRIM_STEP 4095
#define L4GW_TRIM_STEPS 64
/* Bytes of l4gw_events; userspace sizes it to the flows it holds before load. */
#define L4GW_EVENTS_BYTES (256 * 1024)

struct l4gw_ctr {
	__u64 bytes;	/* payload bytes redirected to the peer */
	__u64 skbs;	/* skbs redirected */
	__u64 passes;	/* payload skbs passed (no peer entry): anomaly */
	__u64 fails;	/* redirect helper failures (passed): anomaly */
	__u64 fin;	/* zero-length skbs seen (dropped: R3) */
	__u64 held;	/* payload bytes held for userspace (R12) */
	__u64 holds;	/* skbs held */
	__u64 trimmed;	/* bytes cut off the head of skbs that overlapped earlier ones (R18) */
	__u64 next_seq;	/* R18: bit 32 set once known; low 32 bits: seq of the next new byte */
};

/* Written by userspace only. */
struct l4gw_credit {
	__u64 limit;		/* redirect while bytes + len <= limit */
	__u64 forwarded;	/* held bytes userspace has written to the peer */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, L4GW_MAX_SOCKS);
	__type(key, __u64);
	__type(value, __u64);
} l4gw_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, L4GW_MAX_SOCKS);
	__type(key, __u64);
	__type(value, __u64);
} l4gw_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4GW_MAX_SOCKS);
	__type(key, __u64);
	__type(value, __u64);
} l4gw_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4GW_MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct l4gw_ctr);
} l4gw_ctrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, L4GW_MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct l4gw_credit);
} l4gw_credit SEC(".maps");

/* R19: cookies (__u64) of sockets whose hold began or that met an anomaly. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, L4GW_EVENTS_BYTES);
} l4gw_events SEC(".maps");

static __always_inline void notify(__u64 cookie)
{
	bpf_ringbuf_output(&l4gw_events, &cookie, sizeof(cookie), 0);
}

SEC("sk_skb/stream_verdict")
int l4gw_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct l4gw_ctr *c = bpf_map_lookup_elem(&l4gw_ctrs, &cookie);
	struct l4gw_credit *credit;
	__u32 len = skb->len;
	__u64 *peer;
	__u64 key;
	long verdict;

	if (len == 0) {
		if (c)
			__sync_fetch_and_add(&c->fin, 1);
		return SK_DROP;
	}
	if (c) {
		/* R18: only bytes past the last one seen are new. */
		__u32 seq = skb->cb[0];

		if (!(c->next_seq >> 32)) {
			/* The first payload skb since arming: tcp_read_skb has consumed nothing
			 * yet, so copied_seq is where userspace stopped reading. */
			struct bpf_sock *sk = skb->sk;
			struct tcp_sock *tp = sk ? bpf_skc_to_tcp_sock(sk) : 0;

			if (tp)
				c->next_seq = (1ULL << 32) | tp->copied_seq;
		}
		if (c->next_seq >> 32) {
			__s32 overlap = (__s32)((__u32)c->next_seq - seq);

			if (overlap > 0 && (__u32)overlap >= len) {
				c->trimmed += len;
				return SK_DROP;
			}
			for (int i = 0; i < L4GW_TRIM_STEPS && overlap > 0; i++) {
				__s32 step = overlap > L4GW_TRIM_STEP ? L4GW_TRIM_STEP : overlap;

				if (bpf_skb_adjust_room(skb, -step, 0, 0))
					break;
				overlap -= step;
				seq += step;
				c->trimmed += step;
			}
			if (overlap > 0) {
				/* Could not cut it: keep it on the source, an anomaly userspace
				 * answers with a reset (a duplicate must never pass). */
				__sync_fetch_and_add(&c->fails, 1);
				notify(cookie);
				return SK_PASS;
			}
			len = skb->len;
		}
		c->next_seq = (1ULL << 32) | (__u32)(seq + len);
	}
	peer = bpf_map_lookup_elem(&l4gw_peers, &cookie);
	if (!peer) {
		if (c)
			__sync_fetch_and_add(&c->passes, 1);
		notify(cookie);
		return SK_PASS;
	}
	credit = bpf_map_lookup_elem(&l4gw_credit, &cookie);
	if (c && credit && (c->held != credit->forwarded || c->bytes + len > credit->limit)) {
		if (c->held == credit->forwarded)
			notify(cookie); /* R19: a hold begins */
		c->held += len;
		c->holds += 1;
		return SK_PASS;
	}
	key = *peer;
	verdict = bpf_sk_redirect_hash(skb, &l4gw_targets, &key, 0);
	if (verdict != SK_PASS) {
		/* The helper returns SK_DROP on a miss; the redirect was not set, so
		 * SK_PASS keeps the bytes on the source. */
		if (c)
			__sync_fetch_and_add(&c->fails, 1);
		notify(cookie);
		return SK_PASS;
	}
	if (c) {
		__sync_fetch_and_add(&c->bytes, len);
		__sync_fetch_and_add(&c->skbs, 1);
	}
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
