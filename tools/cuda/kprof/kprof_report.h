// The aggregation behind kprof (kprof.cpp): GPU activity records (kernels,
// copies, memsets) inside the capture windows (cuProfilerStart .. Stop), summed
// per name, with the GPU-busy time (the union of the records' intervals) set
// against the windows' wall time. Pure C++, tested on the CPU by
// tests/kprof_report.rs (report_test.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace kprof {

struct Record {
  std::string name;  // kernel name (demangled), or "[memcpy HtoD]" etc.
  uint64_t start, end;  // ns, CUPTI's clock
};

struct Window {
  uint64_t start, end;  // ns; end == UINT64_MAX while open
};

struct Row {
  std::string name;
  uint64_t count = 0, total_ns = 0;
};

struct Report {
  uint64_t window_ns = 0;  // the windows' summed wall time
  uint64_t busy_ns = 0;    // union of the recorded intervals inside the windows
  uint64_t summed_ns = 0;  // sum of the recorded durations (> busy if kernels overlap)
  uint64_t records = 0;
  std::vector<Row> rows;  // by total time, largest first
};

// A record counts when it lies inside a window (starts at or after its start
// and ends at or before its end). No windows: every record counts, and the
// window is the span from the first record's start to the last one's end.
inline Report aggregate(const std::vector<Record>& recs, std::vector<Window> wins) {
  Report r;
  if (wins.empty()) {
    if (recs.empty()) return r;
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const auto& x : recs) lo = std::min(lo, x.start), hi = std::max(hi, x.end);
    wins.push_back({lo, hi});
  }
  uint64_t last_end = 0;
  for (const auto& x : recs) last_end = std::max(last_end, x.end);
  for (auto& w : wins)
    if (w.end == UINT64_MAX) w.end = std::max(last_end, w.start);
  std::map<std::string, Row> by;
  std::vector<std::pair<uint64_t, uint64_t>> iv;
  for (const auto& x : recs) {
    if (x.end < x.start) continue;
    bool inside = false;
    for (const auto& w : wins)
      if (x.start >= w.start && x.end <= w.end) inside = true;
    if (!inside) continue;
    Row& row = by[x.name];
    row.name = x.name;
    row.count++;
    row.total_ns += x.end - x.start;
    r.summed_ns += x.end - x.start;
    r.records++;
    iv.push_back({x.start, x.end});
  }
  for (const auto& w : wins) r.window_ns += w.end - w.start;
  std::sort(iv.begin(), iv.end());
  uint64_t cur_s = 0, cur_e = 0;
  bool open = false;
  for (const auto& [s, e] : iv) {
    if (open && s <= cur_e) {
      cur_e = std::max(cur_e, e);
    } else {
      if (open) r.busy_ns += cur_e - cur_s;
      cur_s = s, cur_e = e, open = true;
    }
  }
  if (open) r.busy_ns += cur_e - cur_s;
  for (auto& [_, row] : by) r.rows.push_back(row);
  std::sort(r.rows.begin(), r.rows.end(), [](const Row& a, const Row& b) {
    return a.total_ns != b.total_ns ? a.total_ns > b.total_ns : a.name < b.name;
  });
  return r;
}

// The table: header lines, then one line per name (at most `top`, the rest
// summed in one "(other N names)" line). Times in ms; `per` divides them
// (the number of profiled steps, so the figures are per step). "%sum" is a
// name's share of the summed GPU time.
inline void print(FILE* f, const Report& r, const char* label, size_t top, double per) {
  if (per <= 0) per = 1;
  double ms = 1e-6 / per;
  fprintf(f, "kprof: %s\n", label);
  fprintf(f, "kprof: window %.3f ms, GPU busy %.3f ms (%.1f%%), idle %.3f ms, %llu records, per %.0f\n",
          r.window_ns * ms, r.busy_ns * ms, r.window_ns ? 100.0 * r.busy_ns / r.window_ns : 0.0,
          (r.window_ns - std::min(r.window_ns, r.busy_ns)) * ms, (unsigned long long)r.records, per);
  fprintf(f, "kprof: %10s %6s %8s %10s  %s\n", "ms", "%sum", "count", "us/call", "name");
  uint64_t rest_ns = 0, rest_n = 0, rest_names = 0;
  for (size_t i = 0; i < r.rows.size(); i++) {
    const Row& x = r.rows[i];
    if (i < top) {
      fprintf(f, "kprof: %10.3f %6.1f %8.1f %10.2f  %s\n", x.total_ns * ms,
              r.summed_ns ? 100.0 * x.total_ns / r.summed_ns : 0.0, x.count / per,
              x.count ? x.total_ns * 1e-3 / x.count : 0.0, x.name.c_str());
    } else {
      rest_ns += x.total_ns, rest_n += x.count, rest_names++;
    }
  }
  if (rest_names)
    fprintf(f, "kprof: %10.3f %6.1f %8.1f %10s  (other %llu names)\n", rest_ns * ms,
            r.summed_ns ? 100.0 * rest_ns / r.summed_ns : 0.0, rest_n / per, "",
            (unsigned long long)rest_names);
}

}  // namespace kprof
