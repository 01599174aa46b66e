#include <accelerate/environment.h>

#include <gtest/gtest.h>

#include "expect_error.h"

#include <cstdlib>

using accelerate::detect_topology;
using accelerate::EnvMap;

namespace {

using accelerate::testing::error_of;

}  // namespace

TEST(Environment, ParseBoolAcceptsAccelerateSpellings) {
  for (const char* v : {"1", "y", "YES", "t", "True", "on"}) {
    EXPECT_TRUE(accelerate::parse_bool(v, "X")) << v;
  }
  for (const char* v : {"0", "n", "No", "f", "FALSE", "off"}) {
    EXPECT_FALSE(accelerate::parse_bool(v, "X")) << v;
  }
  auto msg = error_of([] { accelerate::parse_bool("maybe", "ACCELERATE_USE_CPU"); });
  EXPECT_NE(msg.find("ACCELERATE_USE_CPU='maybe'"), std::string::npos) << msg;
}

TEST(Environment, EnvIntRejectsGarbage) {
  EnvMap env{{"WORLD_SIZE", "4x"}};
  auto msg = error_of([&] { accelerate::env_int(env, "WORLD_SIZE"); });
  EXPECT_NE(msg.find("WORLD_SIZE='4x' is not an integer"), std::string::npos) << msg;
  EXPECT_FALSE(accelerate::env_int(EnvMap{{"WORLD_SIZE", ""}}, "WORLD_SIZE").has_value());
}

TEST(Environment, NoVariablesMeansOneProcess) {
  auto t = detect_topology({});
  EXPECT_EQ(t.source, "none");
  EXPECT_EQ(t.rank, 0);
  EXPECT_EQ(t.world_size, 1);
  EXPECT_EQ(t.local_rank, 0);
  EXPECT_EQ(t.local_world_size, 1);
  EXPECT_EQ(t.master_addr, "127.0.0.1");
  EXPECT_EQ(t.master_port, 29500);
}

TEST(Environment, TorchrunVariables) {
  auto t = detect_topology({{"RANK", "5"},
                            {"WORLD_SIZE", "8"},
                            {"LOCAL_RANK", "1"},
                            {"LOCAL_WORLD_SIZE", "4"},
                            {"MASTER_ADDR", "10.1.2.3"},
                            {"MASTER_PORT", "1234"}});
  EXPECT_EQ(t.source, "torchrun");
  EXPECT_EQ(t.rank, 5);
  EXPECT_EQ(t.world_size, 8);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.local_world_size, 4);
  EXPECT_EQ(t.master_addr, "10.1.2.3");
  EXPECT_EQ(t.master_port, 1234);
}

TEST(Environment, OpenMpiVariables) {
  auto t = detect_topology({{"OMPI_COMM_WORLD_RANK", "3"},
                            {"OMPI_COMM_WORLD_SIZE", "4"},
                            {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                            {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  EXPECT_EQ(t.source, "openmpi");
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world_size, 4);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.local_world_size, 2);
}

TEST(Environment, PmiVariables) {
  auto t = detect_topology({{"PMI_RANK", "2"}, {"PMI_SIZE", "3"}});
  EXPECT_EQ(t.source, "pmi");
  EXPECT_EQ(t.rank, 2);
  EXPECT_EQ(t.world_size, 3);
  // Without local variables every process counts as being on one machine.
  EXPECT_EQ(t.local_rank, 2);
  EXPECT_EQ(t.local_world_size, 3);
}

TEST(Environment, SlurmVariables) {
  auto t = detect_topology({{"SLURM_PROCID", "3"},
                            {"SLURM_NTASKS", "6"},
                            {"SLURM_LOCALID", "0"},
                            {"SLURM_TASKS_PER_NODE", "3(x2)"},
                            {"SLURM_LAUNCH_NODE_IPADDR", "10.0.0.9"}});
  EXPECT_EQ(t.source, "slurm");
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world_size, 6);
  EXPECT_EQ(t.local_rank, 0);
  EXPECT_EQ(t.local_world_size, 3);
  EXPECT_EQ(t.master_addr, "10.0.0.9");
  // MASTER_ADDR, when set, wins over SLURM's launch node.
  auto u = detect_topology({{"SLURM_PROCID", "0"},
                            {"SLURM_NTASKS", "2"},
                            {"SLURM_LAUNCH_NODE_IPADDR", "10.0.0.9"},
                            {"MASTER_ADDR", "10.0.0.1"}});
  EXPECT_EQ(u.master_addr, "10.0.0.1");
}

TEST(Environment, TorchrunVariablesWinOverMpiAndSlurm) {
  auto t = detect_topology({{"RANK", "1"},
                            {"WORLD_SIZE", "2"},
                            {"OMPI_COMM_WORLD_RANK", "0"},
                            {"OMPI_COMM_WORLD_SIZE", "9"},
                            {"SLURM_PROCID", "0"},
                            {"SLURM_NTASKS", "7"}});
  EXPECT_EQ(t.source, "torchrun");
  EXPECT_EQ(t.world_size, 2);
}

TEST(Environment, InconsistentTopologyIsAnError) {
  EXPECT_NE(error_of([] {
              detect_topology({{"RANK", "4"}, {"WORLD_SIZE", "4"}});
            }).find("rank 4 is outside the world size 4"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              detect_topology({{"WORLD_SIZE", "0"}});
            }).find("world size must be at least 1"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              detect_topology({{"WORLD_SIZE", "2"}});
            }).find("RANK is not"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              detect_topology({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}});
            }).find("MASTER_PORT=70000 is not a TCP port"),
            std::string::npos);
  EXPECT_NE(
      error_of([] {
        detect_topology(
            {{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}});
      }).find("local rank 2 is outside the local world size 2"),
      std::string::npos);
}

TEST(Environment, PatchEnvironmentRestores) {
  ::setenv("ACC_TEST_KEEP", "old", 1);
  ::unsetenv("ACC_TEST_NEW");
  {
    auto guard =
        accelerate::patch_environment({{"acc_test_keep", "patched"}, {"ACC_TEST_NEW", "x"}});
    EXPECT_STREQ(std::getenv("ACC_TEST_KEEP"), "patched");
    EXPECT_STREQ(std::getenv("ACC_TEST_NEW"), "x");
  }
  EXPECT_STREQ(std::getenv("ACC_TEST_KEEP"), "old");
  EXPECT_EQ(std::getenv("ACC_TEST_NEW"), nullptr);
  {
    auto guard = accelerate::clear_environment();
    EXPECT_EQ(std::getenv("ACC_TEST_KEEP"), nullptr);
    EXPECT_TRUE(accelerate::current_environment().empty());
  }
  EXPECT_STREQ(std::getenv("ACC_TEST_KEEP"), "old");
  ::unsetenv("ACC_TEST_KEEP");
}
