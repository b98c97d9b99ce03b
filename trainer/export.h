// `moetrain export`: a checkpoint as Hugging Face safetensors files (DeepSeek-V3 names,
// config.json; io/hf_export.h has the mapping, io/safetensors.h the format).
//
// Streams one tensor at a time, in row chunks of at most 64 MiB of FP32, so memory does not
// grow with the model. Every file is written under "<name>.tmp.<pid>" in the output folder
// and renamed into place only once all of them are complete; on any failure the temporary
// files (and an output folder the export created) are removed, and the error is one line
// naming what and where. Files of an earlier export in the same folder that this one does
// not replace (model.safetensors, the index, model-*-of-*.safetensors) are removed after the
// new ones are in place, so a loader never mixes two exports.
#pragma once

#include <string>

#include "io/hf_export.h"

namespace moe {

struct ExportArgs {
  std::string checkpoint;  // a checkpoint file, or a folder (its newest readable checkpoint)
  std::string output;      // output folder, created when missing
  std::string format = "safetensors";
  ExportOptions opt;
};

int export_main(const ExportArgs& args);

}  // namespace moe
