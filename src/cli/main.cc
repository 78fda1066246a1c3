// The `nestcache` program: builds the command line from the workload
// registry and dispatches to the commands (commands.h).
#include <cerrno>
#include <cstdio>
#include <string>
#include <system_error>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "host/fault_injection.h"

namespace {

const std::string kAbout =
    "nestcache models a nested-VMX hypervisor stack (L0 -> L1 -> L2) in user space with real memory, real\n"
    "mappings and their real system-call and TLB costs, and a simulated processor. It compares how L0\n"
    "reaches the pages L1 names for L2 -- map (map and unmap on every nested entry and exit, the kernel\n"
    "today), cache (persistent pfn caches kept valid by invalidation, the seed) and oracle (no mapping,\n"
    "the physical limit) -- on cost, and on correctness when the host migrates pages or the VMM changes\n"
    "memslots.\n\n"
    "  nestcache selftest   list and run the correctness scenarios\n"
    "  nestcache bench      time the seed's benchmark for each strategy, side by side\n"
    "  nestcache run FILE   run scenario files: steps with the outcome KVM gives for each\n"
    "  nestcache stress     soak: every kind of churn at once, nothing stale, lost or leaked\n"
    "  nestcache            the main job: the seed's benchmark table, every strategy\n";

// The command line a parse error belongs to: the deepest sub-command parsed
// ("nestcache selftest memslots"), or the one above it that owns the option
// the message starts with (`nestcache --inject-fault bogus bench` fails in
// the top level's --inject-fault, not in bench).
std::string parsed_command(CLI::App& app, std::string_view message = {}) {
  std::vector<CLI::App*> chain{&app};
  while (!chain.back()->get_subcommands().empty()) chain.push_back(chain.back()->get_subcommands().back());
  if (message.starts_with("--")) {
    const std::string option(message.substr(0, message.find(':')));
    size_t owner = chain.size();
    while (owner > 0 && chain[owner - 1]->get_option_no_throw(option) == nullptr) owner--;
    if (owner > 0) chain.resize(owner);
  }
  std::string command = "nestcache";
  for (size_t i = 1; i < chain.size(); i++) command += " " + chain[i]->get_name();
  return command;
}

// An argument no command takes (CLI11's ExtrasError): the command line it was
// given to, and the arguments in the order given. CLI11 lists those a
// sub-command passed back to the top last first ("4 --slots" for
// `selftest nested-pages --slots 4`).
struct Extras {
  std::string command, message;
};
Extras extras_message(CLI::App& app) {
  std::string command = parsed_command(app);
  std::vector<std::string> extras = app.remaining(true);
  std::string args;
  for (const std::string& a : extras) args += (args.empty() ? "" : " ") + a;
  return {command, fmt::format("{} {}: not an option or argument of this command (see `{} --help`)",
                               extras.size() > 1 ? "unexpected arguments" : "unexpected argument", args, command)};
}

// Runs the command the parsed line names; returns the exit status.
int dispatch(CLI::App* selftest_cmd, nestcache::cli::SelftestArgs& selftest, CLI::App* bench_cmd,
             const nestcache::cli::BenchArgs& bench, CLI::App* run_cmd, const nestcache::cli::RunArgs& run,
             const nestcache::cli::StressArgs& stress, bool json) {
  using namespace nestcache;
  if (selftest_cmd->parsed()) return cli::run_selftest_command(selftest, json || selftest.json);
  if (bench_cmd->parsed()) return cli::run_bench_command(bench, json || bench.json);
  if (run_cmd->parsed()) return cli::run_run_command(run, json || run.json);
  if (stress.command->parsed()) return cli::run_stress_command(stress, json || stress.json);
  return cli::run_default_job(json);
}

// Descriptors 0, 1 and 2 that the caller closed (`nestcache ... >&-`) are
// opened on /dev/null before anything else is: otherwise the first memfd
// would become descriptor 1 and what is printed would be written into guest
// memory. Returns true if stdout was closed (its output then has nowhere to
// go: an error at the end).
bool open_closed_standard_descriptors() {
  bool stdout_closed = false;
  for (int fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    const int opened = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
    if (opened >= 0 && opened != fd) close(opened);  // cannot happen: the lowest free number is fd
    stdout_closed = stdout_closed || fd == 1;
  }
  return stdout_closed;
}

// Whether --json is on the command line (a usage error or --help may come
// before it is parsed).
bool json_on_line(int argc, char** argv) {
  for (int i = 1; i < argc; i++)
    if (std::string_view(argv[i]) == "--json") return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace nestcache;
  const bool stdout_closed = open_closed_standard_descriptors();
  // A usage error, --help and a failure are JSON under --json too (--json
  // may not have been parsed yet, so the line is searched for it).
  const bool json_output = json_on_line(argc, argv);
  workloads::register_all();

  CLI::App app(kAbout, "nestcache");
  app.require_subcommand(0, 1);
  app.set_help_all_flag("--help-all", "Print this help with every command's and selftest's options, and exit");
  bool json = false;
  app.add_flag("--json", json, "Print results as JSON (every command takes --json)");
  app.footer(
      "Every command has --help (e.g. `nestcache selftest memslots --help`). Counters have one snake_case\n"
      "name everywhere: in the output, the JSON and the tests.\n"
      "Exit status: 0 success, 1 a test failed or could not run, 2 a usage error.");

  cli::SelftestArgs selftest;
  cli::BenchArgs bench;
  CLI::App* selftest_cmd = cli::add_selftest_command(app, selftest);
  CLI::App* bench_cmd = cli::add_bench_command(app, bench);
  cli::RunArgs run;
  CLI::App* run_cmd = cli::add_run_command(app, run);
  cli::StressArgs stress;
  cli::add_stress_command(app, stress);
  std::vector<std::string> faults;
  app.add_option("--inject-fault", faults,
                 "For tests: make the Nth mmap, remap-window munmap, memfd set-up or thread start of this run fail, "
                 "as the kernel does at a resource limit (SITE:N, SITE:N+ for the Nth and every later one, optional "
                 ":ERRNO; SITE is mmap, munmap, memfd or thread). Repeatable")
      ->type_name("SITE:N[+][:ERRNO]")
      ->group("Testing")
      ->check(cli::registry_validator(host::parse_fault_spec, "fault"));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --help-all end here too, with status 0. CLI11 expands one
    // level of sub-commands; --help-all also prints each selftest's own.
    // Under --json the text is the "help" of one object.
    if (dynamic_cast<const CLI::CallForAllHelp*>(&e) || dynamic_cast<const CLI::CallForHelp*>(&e)) {
      std::string text;
      if (dynamic_cast<const CLI::CallForAllHelp*>(&e)) {
        text = app.help("", CLI::AppFormatMode::All);
        for (CLI::App* sub : selftest.test_commands) text += "\n" + sub->help();
      } else {
        text = app.help();  // the deepest sub-command named on the line
      }
      if (json_output)
        cli::print_json({{"command", parsed_command(app)}, {"help", text}});
      else
        std::fputs(text.c_str(), stdout);
      return cli::finish_output(cli::kExitOk, stdout_closed);
    }
    if (e.get_exit_code() == 0) return app.exit(e);
    if (dynamic_cast<const CLI::ExtrasError*>(&e)) {
      const Extras x = extras_message(app);
      return cli::finish_output(cli::usage_error(json_output, x.command, x.message), stdout_closed);
    }
    // Every other parse error names the command it belongs to, as the
    // commands' own usage errors do, and points at its --help as an
    // unexpected argument does ("nestcache selftest memslots: --slots: 0 is
    // out of range: 1 to 32764 (see `nestcache selftest memslots --help`)").
    const std::string command = parsed_command(app, e.what());
    std::string what = e.what();
    // An option given twice: CLI11 says "--tests: At Most 1 required but
    // received 2".
    constexpr std::string_view kTwice = ": At Most 1 required but received ";
    if (const size_t at = what.find(kTwice); what.starts_with("--") && at != std::string::npos)
      what = fmt::format("{}: given {} times; give it once", what.substr(0, at), what.substr(at + kTwice.size()));
    return cli::finish_output(
        cli::usage_error(json_output, command, fmt::format("{} (see `{} --help`)", what, command)), stdout_closed);
  }

  for (const std::string& f : faults) host::inject_fault(host::parse_fault_spec(f).value());  // validated by CLI11

  // Nothing escapes main: a resource the run could not get ends it with
  // exit status 1 and its cause, never with std::terminate. The message for
  // running out of memory is a literal, since formatting one needs memory.
  // Under --json a failure is the error object every failed command prints.
  int status;
  int output_errno = 0;  // fmt::print's failure to write stdout, reported by finish_output
  try {
    status = dispatch(selftest_cmd, selftest, bench_cmd, bench, run_cmd, run, stress, json);
  } catch (const std::bad_alloc&) {
    if (json_output)
      std::fputs("{\"error\": {\"command\": \"nestcache\", \"exit_status\": 1, \"kind\": \"failed\", "
                 "\"message\": \"ENOMEM: out of memory\"}}\n",
                 stdout);
    else
      std::fputs("nestcache: ENOMEM: out of memory\n", stderr);
    status = cli::kExitFailed;
  } catch (const std::system_error& e) {
    if (std::ferror(stdout)) {
      output_errno = e.code().value();
      status = cli::kExitFailed;
    } else {
      status = cli::run_error(json_output, parsed_command(app),
                              fmt::format("{}: {}", Error{e.code().value(), ""}.code_name(), e.what()));
    }
  } catch (const std::exception& e) {
    status = cli::run_error(json_output, parsed_command(app), fmt::format("unexpected error: {}", e.what()));
  }
  return cli::finish_output(status, stdout_closed, output_errno);
}
