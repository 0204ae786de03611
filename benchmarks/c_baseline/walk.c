/*
 * The honest limit for kvmemu's batch walk: a plain C 4-level EPT walk over the
 * same random guest-physical addresses, with no model around it.
 *
 * Usage: walk NPAGES GPA_FILE REPEATS [AHEAD [STORE]]
 *   With AHEAD > 0, each walk first prefetches the leaf entry of the walk AHEAD
 *   elements on (the upper levels read normally), as a pipelined walker would.
 *   With STORE = 1, each walk's host-physical address and level go to a uint64 and a
 *   uint8 array made once, as access_many's results do into out= arrays (the work
 *   kvmemu does per element); otherwise they are only summed.
 *   Maps GPAs [0, NPAGES * 4096) with 4K EPT leaves (R|W|X, WB, A, D) in tables
 *   laid out like kvmemu's (a 512-entry uint64 table per 4 KiB, addressed by
 *   frame), reads the uint64 GPAs of GPA_FILE, walks each of them REPEATS times
 *   the way the CPU does (present and permission check at every level, leaf
 *   detection, accessed bit), and prints "ns_per_walk <value>" and a checksum.
 */
#include "tables.h"
#include <time.h>

#define EPT_R 0x1ull
#define EPT_W 0x2ull
#define EPT_X 0x4ull
#define EPT_LARGE 0x80ull
#define EPT_A 0x100ull
#define EPT_D 0x200ull
#define EPT_WB (6ull << 3)

static void map_4k(uint64_t gpa, uint64_t hpa)
{
	uint64_t table = 0;
	for (int level = 4; level > 1; level--) {
		uint64_t *e = &mem[table * ENTRIES + ((gpa >> (12 + 9 * (level - 1))) & 511)];
		if (!(*e & (EPT_R | EPT_W | EPT_X))) {
			uint64_t child = new_table();
			e = &mem[table * ENTRIES + ((gpa >> (12 + 9 * (level - 1))) & 511)];
			*e = (child << 12) | EPT_R | EPT_W | EPT_X | EPT_A;
		}
		table = (*e & ADDR_MASK) >> 12;
	}
	mem[table * ENTRIES + ((gpa >> 12) & 511)] =
		(hpa & ADDR_MASK) | EPT_R | EPT_W | EPT_X | EPT_WB | EPT_A | EPT_D;
}

/* Returns the HPA, or ~0 on a violation. */
static inline uint64_t walk(uint64_t gpa)
{
	uint64_t table = 0, perm = EPT_R | EPT_W | EPT_X, e = 0;
	for (int level = 4; level >= 1; level--) {
		if (table >= ntables)
			return ~0ull;
		uint64_t *p = &mem[table * ENTRIES + ((gpa >> (12 + 9 * (level - 1))) & 511)];
		e = *p;
		perm &= e;
		if (!(e & (EPT_R | EPT_W | EPT_X)) || !(perm & EPT_R))
			return ~0ull;
		if (!(e & EPT_A))
			*p = e | EPT_A;
		if (level == 1 || (e & EPT_LARGE))
			break;
		table = (e & ADDR_MASK) >> 12;
	}
	return (e & ADDR_MASK) | (gpa & 0xfff);
}

static inline void prefetch_leaf(uint64_t gpa)
{
	uint64_t table = 0;
	for (int level = 4; level > 1; level--) {
		uint64_t e = mem[table * ENTRIES + ((gpa >> (12 + 9 * (level - 1))) & 511)];
		if (!(e & EPT_R) || (e & EPT_LARGE))
			return;
		table = (e & ADDR_MASK) >> 12;
		if (table >= ntables)
			return;
	}
	__builtin_prefetch(&mem[table * ENTRIES + ((gpa >> 12) & 511)], 1, 3);
}

int main(int argc, char **argv)
{
	if (argc < 4 || argc > 6) {
		fprintf(stderr, "usage: %s NPAGES GPA_FILE REPEATS [AHEAD [STORE]]\n", argv[0]);
		return 2;
	}
	long ahead = argc >= 5 ? strtol(argv[4], NULL, 0) : 0;
	int store = argc == 6 && strtol(argv[5], NULL, 0) == 1;
	uint64_t npages = strtoull(argv[1], NULL, 0);
	long repeats = strtol(argv[3], NULL, 0);
	long n;
	uint64_t *gpas = read_u64s(argv[2], &n);
	uint64_t *hpa = store ? malloc(n * sizeof(uint64_t)) : NULL;
	uint8_t *level = store ? malloc(n) : NULL;
	if (store && (!hpa || !level))
		return 2;

	new_table();
	for (uint64_t i = 0; i < npages; i++)
		map_4k(i << 12, 0x7f0000000000ull + (i << 12));

	uint64_t sum = 0;
	struct timespec t0, t1;
	double best = 1e30;
	for (long r = 0; r < repeats; r++) {
		clock_gettime(CLOCK_MONOTONIC, &t0);
		for (long i = 0; i < n; i++) {
			if (ahead && i + ahead < n)
				prefetch_leaf(gpas[i + ahead]);
			uint64_t h = walk(gpas[i]);
			if (store) {
				hpa[i] = h;
				level[i] = 1;
			} else {
				sum += h;
			}
		}
		clock_gettime(CLOCK_MONOTONIC, &t1);
		double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
		if (ns < best)
			best = ns;
	}
	for (long i = 0; store && i < n; i++)
		sum += hpa[i] + level[i];
	printf("ns_per_walk %.3f\nchecksum %llu\n", best / n, (unsigned long long)sum);
	return 0;
}
