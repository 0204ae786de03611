/*
 * What the C baselines share: 512-entry uint64 tables laid out like kvmemu's (table k
 * at frame k, table 0 the root, grown by doubling) and the reading of the uint64 input
 * file that the benchmark writes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define ENTRIES 512
#define ADDR_MASK 0x000ffffffffff000ull

static uint64_t *mem;           /* tables, ENTRIES each; table k at frame k */
static uint64_t ntables, captables;

static uint64_t new_table(void)
{
	if (ntables == captables) {
		captables = captables ? 2 * captables : 64;
		mem = realloc(mem, captables * ENTRIES * sizeof(uint64_t));
		if (!mem)
			exit(2);
	}
	for (int i = 0; i < ENTRIES; i++)
		mem[ntables * ENTRIES + i] = 0;
	return ntables++;
}

/* The uint64 values of PATH (native byte order); their count in *n.  Exits 2 on error. */
static uint64_t *read_u64s(const char *path, long *n)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		exit(2);
	fseek(f, 0, SEEK_END);
	*n = ftell(f) / 8;
	fseek(f, 0, SEEK_SET);
	uint64_t *values = malloc(*n * sizeof(uint64_t));
	if (!values || fread(values, 8, *n, f) != (size_t)*n)
		exit(2);
	fclose(f);
	return values;
}
