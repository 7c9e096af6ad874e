// mfbench-train: Full-FT and LoRA training of an HF model folder on a pre-tokenized file.
// Run with --help for the options; docs/native.md describes inputs, outputs and formats,
// docs/contracts.md the run spec (--workload), the plan (--plan) and the summary.
#include <cstdio>
#include <new>

#include "common.h"
#include "config.h"
#include "trainer.h"

int main(int argc, char** argv) {
    using namespace mfb;
    try {
        if (argc == 1) {
            std::fputs(usage(), stderr);
            return 2;
        }
        bool help = false;
        RunOptions opt = parse_options(argc, argv, help);
        if (help) {
            std::fputs(usage(), stdout);
            return 0;
        }
        return train(opt);
    } catch (const Error& e) {
        std::fprintf(stderr, "%s\n", e.line().c_str());
        return 2;
    } catch (const std::bad_alloc&) {
        std::fprintf(stderr, "mfbench-train: error: out of memory (expected a smaller batch, seq-len or model)\n");
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mfbench-train: error: %s\n", e.what());
        return 1;
    }
}
