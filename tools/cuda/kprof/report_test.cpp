// Checks kprof_report.h's windowing, busy-time union and table; built and run
// by tests/kprof_report.rs. Prints the table and "ok", or why it failed.
#include <cstdio>
#include <cstdlib>

#include "kprof_report.h"

#define CHECK(c)                                            \
  do {                                                      \
    if (!(c)) {                                             \
      fprintf(stderr, "check failed line %d: %s\n", __LINE__, #c); \
      return 1;                                             \
    }                                                       \
  } while (0)

int main() {
  using kprof::Record;
  std::vector<Record> recs = {
      {"init", 0, 50},      // before the window
      {"gemm", 100, 200},   // inside
      {"gemm", 150, 260},   // overlaps the first (concurrent streams)
      {"softmax", 300, 320},
      {"straddle", 390, 420},  // crosses the window's end: left out
      {"after", 500, 510},     // after the window
      {"gemm", 600, 640},      // inside the second window
  };
  auto r = kprof::aggregate(recs, {{100, 400}, {590, 650}});
  CHECK(r.window_ns == 300 + 60);
  CHECK(r.records == 4);
  CHECK(r.summed_ns == 100 + 110 + 20 + 40);
  CHECK(r.busy_ns == 160 + 20 + 40);  // [100,260] + [300,320] + [600,640]
  CHECK(r.rows.size() == 2);
  CHECK(r.rows[0].name == "gemm" && r.rows[0].count == 3 && r.rows[0].total_ns == 250);
  CHECK(r.rows[1].name == "softmax" && r.rows[1].count == 1);

  // No windows: everything, over the span of the records.
  auto all = kprof::aggregate(recs, {});
  CHECK(all.records == recs.size());
  CHECK(all.window_ns == 640);
  CHECK(all.busy_ns == 50 + 160 + 20 + 30 + 10 + 40);

  // A window still open at exit ends at the last record.
  auto open = kprof::aggregate(recs, {{590, UINT64_MAX}});
  CHECK(open.records == 1 && open.window_ns == 50);

  // Contained intervals do not count twice.
  auto nested = kprof::aggregate({{"a", 0, 100}, {"b", 10, 20}, {"c", 100, 110}}, {});
  CHECK(nested.busy_ns == 110 && nested.summed_ns == 120);

  CHECK(kprof::aggregate({}, {}).records == 0);

  kprof::print(stdout, r, "test", 1, 2.0);
  printf("ok\n");
  return 0;
}
