// Issue 9: a corrupted token shard is found at open (header, size, checksums) or, where the
// format has nothing to check it by, when a window is read; either way with one line that
// names the file and the byte. Ends with `moetrain train` on a corrupted shard.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "io/dataset.h"
#include "tests/temp_dir_test.h"
#include "model/check.h"
#include "tests/run_binary.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

class ShardCorruption : public TempDirTest {
 protected:
  ShardCorruption() : TempDirTest("moetrain_shard_") {}


  // A byte-token shard of n tokens spanning several checksum blocks: token i = (7 i) % 251.
  std::string good_shard(const std::string& name, size_t n) {
    std::vector<uint32_t> t(n);
    for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>((7 * i) % 251);
    const std::string p = path(name);
    shard_write(p, t, TokenDtype::kU8, 256);
    return p;
  }

  // The UserError message from opening `p`, or "" if it opened.
  static std::string open_error(const std::string& p) {
    try {
      TokenShard s(p);
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  }

};

// One line that starts with the path and contains every one of `parts`.
void expect_error(const std::string& msg, const std::string& p, const std::vector<std::string>& parts) {
  ASSERT_FALSE(msg.empty()) << "no error for " << p;
  EXPECT_EQ(msg.rfind(p + ": ", 0), 0u) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg << "\nwant: " << part;
}

constexpr size_t kTokens = 2 * kShardBlockBytes + 1000;  // three blocks, the last one short
constexpr size_t kTokenEnd = kShardHeaderBytes + kTokens;   // where the checksum table starts

TEST_F(ShardCorruption, IntactShardOpensAndReads) {
  const std::string p = good_shard("ok.bin", kTokens);
  EXPECT_EQ(read_bytes(p).size(), kTokenEnd + 3 * 8);
  TokenShard s(p);
  EXPECT_EQ(s.size(), static_cast<int64_t>(kTokens));
  std::vector<int32_t> out(100);
  s.read(out.data(), static_cast<int64_t>(kTokens) - 100, 100, 256);
  EXPECT_EQ(out[99], static_cast<int32_t>((7 * (kTokens - 1)) % 251));
}

TEST_F(ShardCorruption, TruncationNamesWhereTheFileEnds) {
  const std::string p = good_shard("cut.bin", kTokens);
  const std::string bytes = read_bytes(p);
  write_bytes(p, bytes.substr(0, bytes.size() - 1));  // one checksum byte short
  expect_error(open_error(p), p,
               {"truncated at byte " + std::to_string(bytes.size() - 1),
                "header says " + std::to_string(kTokens) + " tokens (1 bytes each) and 3 block checksums",
                "which need " + std::to_string(bytes.size()) + " bytes"});
  write_bytes(p, bytes.substr(0, kShardBlockBytes));  // cut inside the tokens
  expect_error(open_error(p), p, {"truncated at byte " + std::to_string(kShardBlockBytes)});
  write_bytes(p, bytes.substr(0, 40));  // inside the header
  expect_error(open_error(p), p, {"truncated at byte 40: smaller than the 64-byte shard header"});
}

TEST_F(ShardCorruption, TrailingBytesNameWhereTheyStart) {
  const std::string p = good_shard("long.bin", kTokens);
  const std::string bytes = read_bytes(p);
  write_bytes(p, bytes + "xyz");
  expect_error(open_error(p), p,
               {"trailing bytes from byte " + std::to_string(bytes.size()),
                "but the file holds " + std::to_string(bytes.size() + 3)});
}

// Every single-byte change of the 64-byte header is caught, whichever bits flip.
TEST_F(ShardCorruption, EveryHeaderByteIsChecked) {
  const std::string p = good_shard("hdr.bin", 5000);
  const std::string bytes = read_bytes(p);
  for (size_t at = 0; at < kShardHeaderBytes; ++at)
    for (unsigned mask : {0x01u, 0x03u, 0x80u, 0xffu}) {
      SCOPED_TRACE("byte " + std::to_string(at) + " xor " + std::to_string(mask));
      std::string bad = bytes;
      bad[at] = static_cast<char>(static_cast<unsigned char>(bad[at]) ^ mask);
      write_bytes(p, bad);
      expect_error(open_error(p), p, {"byte"});
    }
  // Which message, for a few fields.
  auto flipped = [&](size_t at, unsigned mask) {
    std::string bad = bytes;
    bad[at] = static_cast<char>(static_cast<unsigned char>(bad[at]) ^ mask);
    write_bytes(p, bad);
    return open_error(p);
  };
  expect_error(flipped(0, 0xff), p, {"bad magic at byte 0"});
  expect_error(flipped(8, 0x80), p, {"unsupported shard version 130 at byte 8"});
  // Version 2 -> 1 (no checksums): the checksum table is then extra bytes.
  expect_error(flipped(8, 0x03), p, {"trailing bytes from byte 5064"});
  for (size_t at : {16u, 24u, 28u, 40u, 56u})
    expect_error(flipped(at, 0x01), p, {"header checksum mismatch: bytes 0 to 55 do not match the checksum at byte 56"});
}

// A flipped token byte, in range or not, is caught at open by its block's checksum, which
// names the block's bytes; a flipped checksum names the same block.
TEST_F(ShardCorruption, FlippedTokenByteFailsItsBlockChecksum) {
  const std::string p = good_shard("tok.bin", kTokens);
  const std::string bytes = read_bytes(p);
  const std::string block1 = "checksum mismatch in bytes " + std::to_string(kShardHeaderBytes + kShardBlockBytes) +
                             " to " + std::to_string(kShardHeaderBytes + 2 * kShardBlockBytes - 1) +
                             " (block 1 of 3, checksum at byte " + std::to_string(kTokenEnd + 8) + "): file corrupted";
  std::string bad = bytes;
  bad[kShardHeaderBytes + kShardBlockBytes + 12345] ^= 0x01;  // still a valid byte token
  write_bytes(p, bad);
  expect_error(open_error(p), p, {block1});
  bad = bytes;
  bad[kTokenEnd + 8 + 3] ^= 0x40;  // block 1's checksum
  write_bytes(p, bad);
  expect_error(open_error(p), p, {block1});
  // The last, short block; and the first of two bad blocks is the one named.
  bad = bytes;
  bad[kTokenEnd - 1] ^= 0x10;
  bad[kShardHeaderBytes + kShardBlockBytes + 1] ^= 0x10;
  write_bytes(p, bad);
  expect_error(open_error(p), p, {"(block 1 of 3"});
  bad = bytes;
  bad[kTokenEnd - 1] ^= 0x10;
  write_bytes(p, bad);
  expect_error(open_error(p), p, {"checksum mismatch in bytes " + std::to_string(kShardHeaderBytes + 2 * kShardBlockBytes) +
                                  " to " + std::to_string(kTokenEnd - 1) + " (block 2 of 3"});
}

// A version 1 shard (no checksums) has its tokens checked against its header's vocabulary at
// open; a token beyond the model's vocabulary is caught when its window is read. Both name
// the token's byte.
TEST_F(ShardCorruption, VersionOneTokenBeyondVocabularyNamesItsByte) {
  std::string h(kShardHeaderBytes, '\0');
  const uint32_t version = 1, dtype = 2, vocab = 1000;
  const uint64_t count = 600;
  std::memcpy(h.data(), kShardMagic, 8);
  std::memcpy(h.data() + 8, &version, 4);
  std::memcpy(h.data() + 12, &dtype, 4);
  std::memcpy(h.data() + 16, &count, 8);
  std::memcpy(h.data() + 24, &vocab, 4);
  std::vector<uint16_t> tokens(count);
  for (size_t i = 0; i < count; ++i) tokens[i] = static_cast<uint16_t>(i % 200);
  auto file = [&]() { return h + std::string(reinterpret_cast<const char*>(tokens.data()), 2 * count); };
  const std::string p = path("v1.bin");
  write_bytes(p, file());
  EXPECT_EQ(open_error(p), "");

  tokens[321] = 0x4100;  // a flipped high byte: 16640, beyond the header's 1000
  write_bytes(p, file());
  expect_error(open_error(p), p,
               {"token 16640 at byte " + std::to_string(kShardHeaderBytes + 2 * 321) +
                " (index 321) exceeds the header's vocabulary 1000 (file corrupted)"});

  tokens[321] = 5;
  tokens[400] = 700;  // within the file's vocabulary, beyond a 256-token model's
  write_bytes(p, file());
  TokenShard s(p);
  std::vector<int32_t> out(static_cast<size_t>(4 * 65));
  dataset_val_batch(s, out.data(), 0, 2, 4, 64, 256);  // windows at 0 and 178
  try {
    dataset_val_batch(s, out.data(), 0, 4, 4, 64, 256);  // the third, at 356, holds it
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_error(e.what(), p, {"token 700 at byte " + std::to_string(kShardHeaderBytes + 2 * 400) +
                               " (index 400) exceeds vocabulary 256"});
  }
}

// Through the binary: `moetrain train` on a shard with one flipped byte stops before the
// first step with one line naming the file and the bytes, and writes nothing.
TEST_F(ShardCorruption, TrainOnCorruptedShardFailsWithOneLine) {
  std::vector<uint32_t> train(300000), val(5000);
  const std::string text = "It was the best of times, it was the worst of times.\n";
  for (size_t i = 0; i < train.size(); ++i) train[i] = static_cast<uint8_t>(text[i % text.size()]);
  for (size_t i = 0; i < val.size(); ++i) val[i] = static_cast<uint8_t>(text[(i + 7) % text.size()]);
  fs::create_directories(dir_ / "data");
  shard_write(path("data/train.bin"), train, TokenDtype::kU8, 256);
  shard_write(path("data/val.bin"), val, TokenDtype::kU8, 256);
  std::string bytes = read_bytes(path("data/train.bin"));
  bytes[kShardHeaderBytes + 123456] ^= 0x04;  // 'e' <-> 'a': still text, still in vocabulary
  write_bytes(path("data/train.bin"), bytes);
  moe_test::write_text(dir_ / "c.toml",
                       "[model]\nd_model = 32\nn_layers = 2\nn_heads = 2\nn_kv_heads = 1\nseq_len = 32\n"
                       "[moe]\nnum_experts = 4\ntop_k = 2\nd_expert = 32\n"
                       "[training]\nsteps = 4\nglobal_batch = 8\nmicro_batch = 4\n"
                       "[data]\ntrain = \"data/train.bin\"\nval = \"data/val.bin\"\n"
                       "[checkpoint]\ndir = \"ckpt\"\nevery = 1\n"
                       "[log]\nmetrics_file = \"metrics.jsonl\"\nsamples = 0\n");
  const fs::path capture = moe_test::fresh_dir("moetrain_shard_out_", std::to_string(::getpid()));
  const moe_test::BinaryResult r = moe_test::run_binary("train --config c.toml", dir_, 60, capture);
  fs::remove_all(capture);
  EXPECT_GE(r.code, 1);
  EXPECT_LT(r.code, 124);
  EXPECT_EQ(r.err, "error: data/train.bin: checksum mismatch in bytes 64 to 300063 (block 0 of 1, "
                   "checksum at byte 300064): file corrupted\n");
  EXPECT_FALSE(fs::exists(dir_ / "ckpt"));
  EXPECT_FALSE(fs::exists(dir_ / "metrics.jsonl"));
}

}  // namespace
}  // namespace moe
