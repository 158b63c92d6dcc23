/*-------------------------------------------------------------------------
 *
 * walvault.c
 *	  An archive module for PostgreSQL 15 and later:
 *	  archive_library = 'walvault'.
 *
 * With archive_command = 'walvault archive-push %p', PostgreSQL starts a
 * shell and a walvault process for every WAL file.  This module instead
 * starts one `walvault archive-server` when the archiver first needs it and
 * hands it each file's path over a socket.  The server runs exactly what
 * archive-push runs and answers with the exit code archive-push would have
 * had; the archiver marks the file archived only when that code is 0.
 *
 * If the server dies, the file at hand fails (PostgreSQL retries it) and the
 * next attempt starts a new server.  The server leaves when its socket
 * closes, that is when the archiver exits, after finishing the file it is on.
 *
 * See docs/WAL.md, "The archive module".
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#if PG_VERSION_NUM < 150000
#error "archive modules need PostgreSQL 15 or later: use archive_command = 'walvault archive-push %p'"
#endif

#if PG_VERSION_NUM >= 160000
#include "archive/archive_module.h"
#else
#include "postmaster/pgarch.h"
#endif
#include "port.h"
#include "utils/guc.h"
#include "utils/memutils.h"

PG_MODULE_MAGIC;

/* walvault.command: how to run walvault, up to (not including) the subcommand. */
static char *walvault_command = NULL;

/* The running server: its process, its end of the socket, its command line. */
static pid_t server_pid = -1;
static int	server_sock = -1;
static char *server_command = NULL;

void		_PG_init(void);

void
_PG_init(void)
{
	DefineCustomStringVariable("walvault.command",
							   "How the walvault archive module runs walvault.",
							   "A shell command line, such as '/usr/local/bin/walvault --config /etc/walvault/walvault.toml'; "
							   "the module appends archive-server and runs it once per archiver process.",
							   &walvault_command,
							   "walvault",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);
	MarkGUCPrefixReserved("walvault");
}

/*
 * Stops the server: closing the socket makes it leave (it is idle between
 * files), and it is reaped here so that none is left behind.  Returns its
 * wait status.
 */
static int
stop_server(void)
{
	int			status = 0;

	if (server_sock >= 0)
		close(server_sock);
	server_sock = -1;
	if (server_pid > 0)
	{
		while (waitpid(server_pid, &status, 0) < 0 && errno == EINTR)
			;
	}
	server_pid = -1;
	if (server_command)
		pfree(server_command);
	server_command = NULL;
	return status;
}

/*
 * Starts `<walvault.command> archive-server` through /bin/sh, its standard
 * input and output one end of a socket pair, its standard error the
 * archiver's (so its messages reach the server log).  The child gets a
 * session of its own: the signals the postmaster sends the archiver's process
 * group (at a shutdown) are not for it; it leaves when the socket closes.
 */
static bool
start_server(void)
{
	int			sv[2];
	pid_t		pid;
	char	   *cmd;
	sigset_t	all;
	sigset_t	saved;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
	{
		ereport(WARNING,
				(errcode_for_socket_access(),
				 errmsg("walvault: could not create a socket pair for the archive server: %m")));
		return false;
	}
	cmd = psprintf("exec %s archive-server", walvault_command);
	fflush(NULL);

	/*
	 * No signal handler of the archiver's may run in the child before exec:
	 * signals stay blocked across the fork, and the child resets the
	 * handlers before it unblocks them.
	 */
	sigfillset(&all);
	sigprocmask(SIG_SETMASK, &all, &saved);
	pid = fork();
	if (pid != 0)
		sigprocmask(SIG_SETMASK, &saved, NULL);
	if (pid < 0)
	{
		int			save_errno = errno;

		close(sv[0]);
		close(sv[1]);
		pfree(cmd);
		errno = save_errno;
		ereport(WARNING,
				(errmsg("walvault: could not start the archive server: %m")));
		return false;
	}
	if (pid == 0)
	{
		/* The child: only async-signal-safe calls until exec. */
		sigset_t	none;
		static const int reset[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGPIPE,
		SIGALRM, SIGUSR1, SIGUSR2, SIGCHLD};

		setsid();
		for (int i = 0; i < (int) lengthof(reset); i++)
			signal(reset[i], SIG_DFL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		if (dup2(sv[1], STDIN_FILENO) < 0 || dup2(sv[1], STDOUT_FILENO) < 0)
			_exit(127);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
		closefrom(3);
#else
		for (int fd = 3; fd < 4096; fd++)
			close(fd);
#endif
		execl("/bin/sh", "sh", "-c", cmd, (char *) NULL);
		_exit(127);
	}
	close(sv[1]);
	server_sock = sv[0];
	server_pid = pid;
	server_command = MemoryContextStrdup(TopMemoryContext, walvault_command);
	ereport(LOG,
			(errmsg("walvault: started the archive server (pid %d): %s", (int) pid, cmd)));
	pfree(cmd);
	return true;
}

static bool
send_all(int fd, const char *buf, size_t len)
{
	while (len > 0)
	{
		ssize_t		n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			return false;
		}
		buf += n;
		len -= (size_t) n;
	}
	return true;
}

/* read_answer's results besides an exit code */
#define ANSWER_LOST		(-1)		/* the server ended, or said something else */
#define ANSWER_AGAIN	(-2)		/* its binary was replaced: ask a new server */

/*
 * Reads the server's answer for one file: its exit code, as a decimal line,
 * or "again" from a server whose walvault binary has been replaced since it
 * started (it leaves after saying so).
 */
static int
read_answer(int fd)
{
	char		line[32];
	size_t		len = 0;

	for (;;)
	{
		ssize_t		n = read(fd, line + len, 1);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return ANSWER_LOST;
		if (line[len] == '\n')
			break;
		if (++len == sizeof(line) - 1)
			return ANSWER_LOST;
	}
	line[len] = '\0';
	if (strcmp(line, "again") == 0)
		return ANSWER_AGAIN;
	if (len == 0 || strspn(line, "0123456789") != len)
		return ANSWER_LOST;
	return atoi(line);
}

/* Reaps a server that ended before answering, and reports how it ended. */
static void
lost_server(const char *file)
{
	pid_t		pid = server_pid;
	char	   *how = wait_result_to_str(stop_server());

	ereport(WARNING,
			(errmsg("walvault: the archive server (pid %d) ended before answering for \"%s\": %s",
					(int) pid, file, how),
			 errhint("Its own messages, if any, are just above. If it could not start, check walvault.command (now \"%s\"): "
					 "it must run walvault, as in '/usr/local/bin/walvault --config /etc/walvault/walvault.toml'.",
					 walvault_command)));
	pfree(how);
}

static bool
archive_file(const char *file, const char *path)
{
	char	   *request;
	int			code = ANSWER_LOST;

	if (strchr(path, '\n') != NULL)
	{
		ereport(WARNING,
				(errmsg("walvault: cannot archive \"%s\": its path holds a newline", file)));
		return false;
	}
	if (server_sock >= 0 && strcmp(server_command, walvault_command) != 0)
	{
		ereport(LOG,
				(errmsg("walvault: walvault.command changed; restarting the archive server")));
		stop_server();
	}

	request = psprintf("%s\n", path);
	for (int attempt = 0; attempt < 3; attempt++)
	{
		if (server_sock < 0 && !start_server())
			break;
		if (!send_all(server_sock, request, strlen(request)))
		{
			/*
			 * A server that ended since the last file (it exits when its
			 * binary or its configuration cannot be used, or was killed)
			 * shows when the request cannot be sent: start another, once.
			 */
			if (attempt == 0)
			{
				stop_server();
				continue;
			}
			lost_server(file);
			break;
		}
		code = read_answer(server_sock);
		if (code == ANSWER_AGAIN && attempt < 2)
		{
			ereport(LOG,
					(errmsg("walvault: the archive server (pid %d) runs a walvault binary that has since been replaced; starting the new one",
							(int) server_pid)));
			stop_server();
			continue;
		}
		if (code < 0)
			lost_server(file);
		break;
	}
	pfree(request);
	if (code < 0)
		return false;
	if (code != 0)
	{
		ereport(WARNING,
				(errmsg("walvault: could not archive \"%s\" (archive-push exit code %d)", file, code),
				 errdetail("walvault's own message is just above.")));
		return false;
	}
	return true;
}

static bool
check_configured(void)
{
	if (walvault_command != NULL && walvault_command[0] != '\0')
		return true;
	ereport(WARNING,
			(errmsg("walvault: walvault.command is empty"),
			 errhint("Set walvault.command to how walvault is run, as in '/usr/local/bin/walvault --config /etc/walvault/walvault.toml'.")));
	return false;
}

#if PG_VERSION_NUM >= 160000

static bool
walvault_check_configured(ArchiveModuleState *state)
{
	return check_configured();
}

static bool
walvault_archive_file(ArchiveModuleState *state, const char *file, const char *path)
{
	return archive_file(file, path);
}

static void
walvault_shutdown(ArchiveModuleState *state)
{
	stop_server();
}

static const ArchiveModuleCallbacks walvault_callbacks = {
	.startup_cb = NULL,
	.check_configured_cb = walvault_check_configured,
	.archive_file_cb = walvault_archive_file,
	.shutdown_cb = walvault_shutdown,
};

const ArchiveModuleCallbacks *
_PG_archive_module_init(void)
{
	return &walvault_callbacks;
}

#else							/* PostgreSQL 15 */

static bool
walvault_check_configured(void)
{
	return check_configured();
}

static void
walvault_shutdown(void)
{
	stop_server();
}

extern PGDLLEXPORT void _PG_archive_module_init(ArchiveModuleCallbacks *cb);

void
_PG_archive_module_init(ArchiveModuleCallbacks *cb)
{
	cb->check_configured_cb = walvault_check_configured;
	cb->archive_file_cb = archive_file;
	cb->shutdown_cb = walvault_shutdown;
}

#endif
