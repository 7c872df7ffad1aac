// The calling thread's OpenMP team size (engine/threads.py's one-thread decode calls). omp_set_num_threads changes
// only the calling thread's count; torch.set_num_threads also sets torch's process-wide count, which every thread
// that first uses torch afterwards copies.
#include <omp.h>

#include "common.h"

namespace jr {

void set_thread_team(int64_t n) {
  JR_CHECK(n >= 1, "a team needs n >= 1 threads");
  omp_set_num_threads(static_cast<int>(n));
}

}  // namespace jr
