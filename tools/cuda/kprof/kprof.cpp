// kprof: a kernel profiler for one process, injected by the CUDA driver
// (CUDA_INJECTION64_PATH=/path/libkprof.so). It records every kernel, copy and
// memset through CUPTI's activity API and, at exit, prints per-name GPU time
// for the work inside the profiler capture range (cuProfilerStart .. Stop,
// which `dreambooth bench step|sample` and tools/cuda/peer_profile.py open
// around their timed steps), with GPU-busy against wall time: the gap is
// launch and framework overhead on the host. The same tool profiles our
// binary and PyTorch, so their tables compare.
//
//   CUDA_INJECTION64_PATH=$PWD/cuda-dist/libkprof.so KPROF_OUT=prof.txt
//   KPROF_PER=5 KPROF_TOP=40 KPROF_LABEL="ours: full fine-tune" <command>
//
// KPROF_OUT: the file to write (default stderr); KPROF_PER: divide the
// figures by this (the number of timed steps); KPROF_TOP: rows (default 40);
// KPROF_LABEL: the table's title. Built by tools/cuda/build.sh.
#include <cupti.h>
#include <cxxabi.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "kprof_report.h"

namespace {

std::mutex mu;
std::vector<kprof::Record>* recs = new std::vector<kprof::Record>();
std::vector<kprof::Window>* wins = new std::vector<kprof::Window>();
bool window_open = false;

void warn(const char* what, CUptiResult r) {
  const char* s = nullptr;
  cuptiGetResultString(r, &s);
  fprintf(stderr, "kprof: %s failed: %s\n", what, s ? s : "?");
}

std::string demangle(const char* name) {
  if (!name) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = (status == 0 && d) ? d : name;
  free(d);
  // Template arguments make cuBLAS's names unreadable; keep the kernel's name.
  if (out.size() > 160) out = out.substr(0, 157) + "...";
  return out;
}

const char* copy_name(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "[memcpy HtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "[memcpy DtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "[memcpy DtoD]";
    default: return "[memcpy other]";
  }
}

void CUPTIAPI buffer_requested(uint8_t** buf, size_t* size, size_t* max_records) {
  *size = 8 << 20;
  *buf = static_cast<uint8_t*>(aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buf, size_t, size_t valid) {
  CUpti_Activity* rec = nullptr;
  std::vector<kprof::Record> got;
  while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(rec);
        got.push_back({demangle(k->name), k->start, k->end});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        auto* c = reinterpret_cast<CUpti_ActivityMemcpy6*>(rec);
        got.push_back({copy_name(c->copyKind), c->start, c->end});
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        auto* m = reinterpret_cast<CUpti_ActivityMemset4*>(rec);
        got.push_back({"[memset]", m->start, m->end});
        break;
      }
      default: break;
    }
  }
  free(buf);
  std::lock_guard<std::mutex> g(mu);
  recs->insert(recs->end(), got.begin(), got.end());
}

void set_window(bool open) {
  uint64_t now = 0;
  cuptiGetTimestamp(&now);
  std::lock_guard<std::mutex> g(mu);
  if (open && !window_open) {
    wins->push_back({now, UINT64_MAX});
    window_open = true;
  } else if (!open && window_open) {
    wins->back().end = now;
    window_open = false;
  }
}

void CUPTIAPI on_api(void*, CUpti_CallbackDomain domain, CUpti_CallbackId id, const void* data) {
  auto* info = static_cast<const CUpti_CallbackData*>(data);
  bool start = (domain == CUPTI_CB_DOMAIN_DRIVER_API && id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart) ||
               (domain == CUPTI_CB_DOMAIN_RUNTIME_API && id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000);
  // Open after the start call returns, close before the stop call runs.
  if (start && info->callbackSite == CUPTI_API_EXIT) set_window(true);
  if (!start && info->callbackSite == CUPTI_API_ENTER) set_window(false);
}

void at_exit() {
  CUptiResult r = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  if (r != CUPTI_SUCCESS) warn("cuptiActivityFlushAll", r);
  std::vector<kprof::Record> rs;
  std::vector<kprof::Window> ws;
  {
    std::lock_guard<std::mutex> g(mu);
    rs = *recs;
    ws = *wins;
  }
  const char* out = getenv("KPROF_OUT");
  const char* label = getenv("KPROF_LABEL");
  const char* per = getenv("KPROF_PER");
  const char* top = getenv("KPROF_TOP");
  FILE* f = out ? fopen(out, "w") : stderr;
  if (!f) {
    fprintf(stderr, "kprof: cannot write %s\n", out);
    f = stderr;
  }
  std::string title = label ? label : "kernels";
  title += ws.empty() ? " (no capture range: the whole process)" : " (inside the capture range)";
  kprof::print(f, kprof::aggregate(rs, ws), title.c_str(), top ? strtoul(top, nullptr, 10) : 40,
               per ? atof(per) : 1.0);
  if (f != stderr) fclose(f);
}

}  // namespace

// Called by the CUDA driver at cuInit when CUDA_INJECTION64_PATH names us.
extern "C" __attribute__((visibility("default"))) int InitializeInjection(void) {
  CUptiResult r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  if (r != CUPTI_SUCCESS) {
    warn("cuptiActivityRegisterCallbacks", r);
    return 0;
  }
  for (CUpti_ActivityKind k : {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                               CUPTI_ACTIVITY_KIND_MEMSET}) {
    r = cuptiActivityEnable(k);
    if (r != CUPTI_SUCCESS) warn("cuptiActivityEnable", r);
  }
  CUpti_SubscriberHandle sub;
  r = cuptiSubscribe(&sub, on_api, nullptr);
  if (r != CUPTI_SUCCESS) {
    warn("cuptiSubscribe (capture range off: the whole process is profiled)", r);
  } else {
    cuptiEnableCallback(1, sub, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart);
    cuptiEnableCallback(1, sub, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop);
    cuptiEnableCallback(1, sub, CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000);
    cuptiEnableCallback(1, sub, CUPTI_CB_DOMAIN_RUNTIME_API, CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000);
  }
  atexit(at_exit);
  fprintf(stderr, "kprof: recording kernels (CUPTI)\n");
  return 1;
}
