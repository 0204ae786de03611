/*
 * The honest limit for kvmemu's dirty logging: the same work in plain C, no model.
 *
 * Usage: dirty_log SLOT_PAGES GFN_FILE REPEATS
 *   Maps the uint64 gfns of GFN_FILE with 4K NPT-style leaves (P|W|U|A|D) in a
 *   4-level table of 512-entry uint64 tables, then times, best of REPEATS:
 *
 *   get_dirty_log: with each listed page's bit set in a SLOT_PAGES-bit bitmap, take
 *     every word of the bitmap (atomic exchange with 0) and, for each bit taken,
 *     walk to the page's leaf and clear W (KVM_GET_DIRTY_LOG without manual
 *     protection);
 *   wp_fault: for each listed page (write-protected), a write walk that finds W
 *     clear, a compare-and-exchange that sets W, the page's dirty bit set, and the
 *     walk again (what a write to a write-protected page costs at least).
 *
 * Prints "ns_per_get_dirty_log <value>", "ns_per_wp_fault <value>" and a checksum.
 */
#include "tables.h"
#include <time.h>

#define P 0x1ull
#define W 0x2ull
#define U 0x4ull
#define A 0x20ull
#define D 0x40ull

static uint64_t *leaf(uint64_t gfn, int create)
{
	uint64_t table = 0;
	for (int level = 4; level > 1; level--) {
		uint64_t *e = &mem[table * ENTRIES + ((gfn >> (9 * (level - 1))) & 511)];
		if (!(*e & P)) {
			if (!create)
				return NULL;
			uint64_t child = new_table();
			e = &mem[table * ENTRIES + ((gfn >> (9 * (level - 1))) & 511)];
			*e = (child << 12) | P | W | U | A;
		}
		table = (*e & ADDR_MASK) >> 12;
	}
	return &mem[table * ENTRIES + (gfn & 511)];
}

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s SLOT_PAGES GFN_FILE REPEATS\n", argv[0]);
		return 2;
	}
	uint64_t slot_pages = strtoull(argv[1], NULL, 0);
	long repeats = strtol(argv[3], NULL, 0);
	long n;
	uint64_t *gfns = read_u64s(argv[2], &n);

	new_table();
	for (long i = 0; i < n; i++)
		*leaf(gfns[i], 1) = ((0x40000000ull >> 12) + gfns[i]) << 12 | P | U | A | D;
	uint64_t words = (slot_pages + 63) / 64;
	uint64_t *bitmap = calloc(words, 8), *out = calloc(words, 8);
	uint64_t sum = 0;
	double best_get = 1e30, best_fault = 1e30;
	for (long r = 0; r < repeats; r++) {
		for (long i = 0; i < n; i++)
			bitmap[gfns[i] >> 6] |= 1ull << (gfns[i] & 63);
		double t0 = now_ns();
		for (uint64_t w = 0; w < words; w++) {
			if (!bitmap[w])
				continue;
			uint64_t mask = __atomic_exchange_n(&bitmap[w], 0, __ATOMIC_SEQ_CST);
			out[w] = mask;
			while (mask) {
				uint64_t *e = leaf(w * 64 + __builtin_ctzll(mask), 0);
				if (e)
					*e &= ~W;
				mask &= mask - 1;
			}
		}
		double t1 = now_ns();
		if (t1 - t0 < best_get)
			best_get = t1 - t0;
		t0 = now_ns();
		for (long i = 0; i < n; i++) {
			uint64_t *e = leaf(gfns[i], 0);
			uint64_t old = *e;
			if (!(old & W)) {
				__atomic_compare_exchange_n(e, &old, old | W, 0, __ATOMIC_SEQ_CST,
							    __ATOMIC_SEQ_CST);
				__atomic_fetch_or(&bitmap[gfns[i] >> 6], 1ull << (gfns[i] & 63),
						  __ATOMIC_SEQ_CST);
			}
			sum += *leaf(gfns[i], 0) & ADDR_MASK;
		}
		t1 = now_ns();
		if (t1 - t0 < best_fault)
			best_fault = t1 - t0;
		for (long i = 0; i < n; i++)
			*leaf(gfns[i], 0) &= ~W;
		for (uint64_t w = 0; w < words; w++)
			bitmap[w] = 0;
	}
	printf("ns_per_get_dirty_log %.3f\nns_per_wp_fault %.3f\nchecksum %llu\n", best_get,
	       best_fault / n, (unsigned long long)(sum + out[0]));
	return 0;
}
